//! Models: `model.toml`, the built-in network and TorchScript loading.
//!
//! A [`LoadedModel`] is owned by one thread (the inference thread); it embeds batches of
//! preprocessed inputs into L2-normalised vectors on the CPU.

pub mod builtin;
pub mod cross_iteration_norm;
pub mod spec;

use std::path::{Path, PathBuf};

use tch::nn;
use tch::{Device, Kind, Tensor};

use self::builtin::ResNetSmall;
use self::spec::{ModelFormat, ModelSpec, SpecError};

/// Errors loading a model or running it.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// `model.toml` is missing or invalid.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The spec is valid TOML but cannot describe a loadable model.
    #[error("unsupported model: {0}")]
    Unsupported(String),
    /// The weights file could not be loaded or does not match the spec.
    #[error("{path}: {message}")]
    Weights {
        /// Weights file involved.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The device string is malformed or the device is unavailable.
    #[error("device {0}")]
    Device(String),
    /// The input has the wrong shape or size for this model.
    #[error("bad input: {0}")]
    Input(String),
    /// The model's output has an unexpected shape.
    #[error("bad output: {0}")]
    Output(String),
    /// libtorch reported an error.
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
}

/// Parses `auto` (CUDA 0 when available, else CPU), `cpu` or `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device, ModelError> {
    let s = s.trim().to_ascii_lowercase();
    match s.as_str() {
        "auto" => Ok(if tch::Cuda::is_available() {
            Device::Cuda(0)
        } else {
            Device::Cpu
        }),
        "cpu" => Ok(Device::Cpu),
        "cuda" => parse_device("cuda:0"),
        other => {
            let index = other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok())
                .ok_or_else(|| {
                    ModelError::Device(format!("{other:?}: expected auto, cpu or cuda:N"))
                })?;
            let count = if tch::Cuda::is_available() {
                tch::Cuda::device_count().max(0) as usize
            } else {
                0
            };
            if index >= count {
                return Err(ModelError::Device(format!(
                    "{other}: not available ({count} CUDA device(s) found)"
                )));
            }
            Ok(Device::Cuda(index))
        }
    }
}

/// Checks that a builtin spec names our architecture and has usable widths.
pub fn check_builtin_spec(spec: &ModelSpec) -> Result<(), ModelError> {
    if spec.architecture != builtin::ARCHITECTURE {
        return Err(ModelError::Unsupported(format!(
            "builtin architecture {:?} (only {:?} exists)",
            spec.architecture,
            builtin::ARCHITECTURE
        )));
    }
    if spec.widths.is_empty() || spec.widths.iter().any(|w| !(1..=MAX_WIDTH).contains(w)) {
        return Err(ModelError::Unsupported(format!(
            "widths must be a non-empty list of channel counts from 1 to {MAX_WIDTH}, got {:?}",
            spec.widths
        )));
    }
    Ok(())
}

/// The most channels a stage of the built-in network may have.
const MAX_WIDTH: i64 = 4096;

/// Loads safetensors weights into `vs`, requiring exactly the store's variable names and
/// shapes (no missing, extra or differently shaped tensors; dtypes are converted).
pub fn load_builtin_weights(vs: &mut nn::VarStore, path: &Path) -> Result<(), ModelError> {
    let error = |message: String| ModelError::Weights {
        path: path.to_path_buf(),
        message,
    };
    let tensors = Tensor::read_safetensors(path).map_err(|e| error(e.to_string()))?;
    let mut variables = vs.variables();
    if tensors.len() != variables.len() {
        return Err(error(format!(
            "{} tensors in the file, the network has {}",
            tensors.len(),
            variables.len()
        )));
    }
    for (name, source) in &tensors {
        let target = variables
            .get_mut(name)
            .ok_or_else(|| error(format!("unexpected tensor {name:?}")))?;
        if source.size() != target.size() {
            return Err(error(format!(
                "tensor {name:?} has shape {:?}, the network needs {:?}",
                source.size(),
                target.size()
            )));
        }
        tch::no_grad(|| -> Result<(), ModelError> {
            let value = source
                .f_to_device(target.device())?
                .f_to_kind(target.kind())?;
            target.f_copy_(&value)?;
            Ok(())
        })?;
    }
    Ok(())
}

enum Backend {
    Builtin {
        // Owns the weights the network's tensors point into.
        _vs: nn::VarStore,
        net: Box<ResNetSmall>,
    },
    Script(tch::CModule),
}

/// A model loaded from a model directory, ready for inference.
pub struct LoadedModel {
    spec: ModelSpec,
    device: Device,
    backend: Backend,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("spec", &self.spec)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl LoadedModel {
    /// Loads `DIR/model.toml` and its weights onto `device`.
    pub fn load(dir: &Path, device: Device) -> Result<LoadedModel, ModelError> {
        let spec = ModelSpec::load(dir)?;
        let weights = dir.join(&spec.weights);
        let weights_error = |message: String| ModelError::Weights {
            path: weights.clone(),
            message,
        };
        if !weights.is_file() {
            return Err(weights_error("weights file not found".into()));
        }
        let backend = match spec.format {
            ModelFormat::Builtin => {
                check_builtin_spec(&spec)?;
                let mut vs = nn::VarStore::new(device);
                let net = Box::new(ResNetSmall::from_spec(&vs.root(), &spec));
                load_builtin_weights(&mut vs, &weights)?;
                vs.freeze();
                Backend::Builtin { _vs: vs, net }
            }
            ModelFormat::Torchscript => {
                let mut module = tch::CModule::load_on_device(&weights, device)
                    .map_err(|e| weights_error(e.to_string()))?;
                module.set_eval();
                Backend::Script(module)
            }
        };
        Ok(LoadedModel {
            spec,
            device,
            backend,
        })
    }

    /// The model's description.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The device the weights live on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Embeds a `[N, C, H, W]` f32 batch (on any device) in eval mode without gradients.
    /// Returns `[N, D]` f32 on the CPU, rows L2-normalised.
    pub fn embed(&self, input: &Tensor) -> Result<Tensor, ModelError> {
        let size = input.size();
        let expected = self.spec.input.shape().map(|d| d as i64);
        if size.len() != 4 || size[1..] != expected {
            return Err(ModelError::Input(format!(
                "shape {size:?}, expected [N, {}, {}, {}]",
                expected[0], expected[1], expected[2]
            )));
        }
        let n = size[0];
        if n == 0 {
            return Ok(Tensor::zeros(
                [0, self.spec.embedding_dim as i64],
                (Kind::Float, Device::Cpu),
            ));
        }
        let out = tch::no_grad(|| -> Result<Tensor, ModelError> {
            let xs = input.f_to_device(self.device)?.f_to_kind(Kind::Float)?;
            let ys = match &self.backend {
                Backend::Builtin { net, .. } => net.forward_t(&xs, false)?,
                Backend::Script(module) => {
                    let ys = module.forward_ts(&[xs])?;
                    let ys = ys.f_to_kind(Kind::Float)?;
                    if ys.dim() != 2 {
                        return Err(ModelError::Output(format!(
                            "TorchScript output shape {:?}, expected [N, D]",
                            ys.size()
                        )));
                    }
                    builtin::l2_normalize(&ys)?
                }
            };
            Ok(ys.f_to_device(Device::Cpu)?)
        })?;
        let expected_out = [n, self.spec.embedding_dim as i64];
        if out.size() != expected_out {
            return Err(ModelError::Output(format!(
                "shape {:?}, expected {expected_out:?}",
                out.size()
            )));
        }
        Ok(out)
    }

    /// Embeds `n` preprocessed inputs laid out back to back (CHW each) and returns one
    /// L2-normalised vector per input.
    pub fn embed_values(&self, values: &[f32], n: usize) -> Result<Vec<Vec<f32>>, ModelError> {
        let numel = self.spec.input.numel();
        if values.len() != n * numel {
            return Err(ModelError::Input(format!(
                "{} values for {n} inputs of {numel} values each",
                values.len()
            )));
        }
        let [c, h, w] = self.spec.input.shape().map(|d| d as i64);
        let input = Tensor::f_from_slice(values)?.f_view([n as i64, c, h, w])?;
        let out = self.embed(&input)?;
        let flat = Vec::<f32>::try_from(&out.f_contiguous()?.f_view([-1])?)?;
        let dim = self.spec.embedding_dim;
        Ok(flat.chunks(dim.max(1)).map(<[f32]>::to_vec).collect())
    }
}

/// Helpers shared by the unit and integration tests: the device under test and real
/// TorchScript files. Not for production code.
#[doc(hidden)]
pub mod test_support {
    use std::path::Path;

    use tch::Device;

    /// The device the device-sensitive unit tests run on: `CROSSBATCH_TEST_DEVICE` (`cpu`,
    /// `cuda:N` or `auto`, parsed by [`super::parse_device`]), the CPU when it is unset. A value
    /// that does not parse, or names a missing GPU, fails the test instead of falling back.
    pub fn test_device() -> Device {
        match std::env::var("CROSSBATCH_TEST_DEVICE") {
            Ok(name) => super::parse_device(&name)
                .unwrap_or_else(|e| panic!("CROSSBATCH_TEST_DEVICE={name:?}: {e}")),
            Err(_) => Device::Cpu,
        }
    }

    /// Exports a TorchScript module without parameters whose `forward(x)` returns the Python
    /// expression `returns`, written in terms of `f = x.flatten(1)`; see
    /// [`export_torchscript`].
    pub fn export_flat_torchscript(returns: &str, out: &Path) -> bool {
        let source = format!(
            "import os, torch\n\
             class M(torch.nn.Module):\n\
             \x20   def forward(self, x):\n\
             \x20       f = x.flatten(1)\n\
             \x20       return {returns}\n\
             torch.jit.script(M()).save(os.environ['OUT'])\n"
        );
        export_torchscript(&source, out)
    }

    /// Set to 1 to let tests skip when a prerequisite (the venv's Python, the Korean fonts) is
    /// missing; otherwise a missing one fails them, so that nothing goes untested unnoticed.
    pub const SKIP_MISSING_ENV: &str = "CROSSBATCH_TEST_SKIP_MISSING";

    /// `false` (with a note) when `what` is missing and [`SKIP_MISSING_ENV`] allows skipping;
    /// panics when it is missing and skipping is not allowed.
    pub fn present_or_skip(present: bool, what: &str) -> bool {
        if present {
            return true;
        }
        let allowed = std::env::var(SKIP_MISSING_ENV).is_ok_and(|v| v == "1");
        assert!(
            allowed,
            "{what} is missing: run scripts/setup.sh (or set {SKIP_MISSING_ENV}=1 to skip)"
        );
        eprintln!("skipped: {what} is missing");
        false
    }

    /// Runs `source` (Python that saves a TorchScript module to the path in `OUT`) with the
    /// project's venv Python. Returns `false` (the caller skips) only when that Python does
    /// not exist and [`present_or_skip`] allows it; an export that fails is a test failure.
    pub fn export_torchscript(source: &str, out: &Path) -> bool {
        let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
        if !present_or_skip(python.exists(), &python.display().to_string()) {
            return false;
        }
        // TorchScript compiles from source, so the script must live in a file.
        let script = out.with_extension("export.py");
        std::fs::write(&script, source).expect("write export script");
        let output = std::process::Command::new(&python)
            .arg(&script)
            .env("OUT", out)
            .output()
            .expect("run python");
        assert!(
            output.status.success(),
            "TorchScript export failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        true
    }
}

#[cfg(test)]
mod tests {
    use super::spec::InputSpec;
    use super::test_support::test_device;
    use super::*;

    fn test_spec(dim: usize) -> ModelSpec {
        ModelSpec {
            name: "test".into(),
            format: ModelFormat::Builtin,
            architecture: builtin::ARCHITECTURE.into(),
            widths: vec![4, 8],
            input: InputSpec {
                channels: 1,
                height: 12,
                width: 10,
                mean: vec![0.5],
                std: vec![0.25],
            },
            embedding_dim: dim,
            weights: "model.safetensors".into(),
        }
    }

    /// Writes a randomly initialised builtin model with non-trivial BN statistics.
    fn write_model(dir: &Path, spec: &ModelSpec) {
        tch::manual_seed(7);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = ResNetSmall::from_spec(&vs.root(), spec);
        // A training-mode forward pass updates the BN running statistics.
        let xs = Tensor::randn([6, 1, 12, 10], (Kind::Float, Device::Cpu));
        let _ = net.forward_t(&xs, true).unwrap();
        spec.save(dir).unwrap();
        vs.save(dir.join(&spec.weights)).unwrap();
    }

    fn inputs(n: usize) -> Vec<f32> {
        (0..n * 120)
            .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
            .collect()
    }

    #[test]
    fn save_load_round_trip_gives_identical_embeddings() {
        let dir = tempfile::tempdir().unwrap();
        let spec = test_spec(16);
        write_model(dir.path(), &spec);
        let device = test_device();
        let a = LoadedModel::load(dir.path(), device).unwrap();
        let b = LoadedModel::load(dir.path(), device).unwrap();
        assert_eq!(a.spec(), &spec);
        let values = inputs(5);
        let ea = a.embed_values(&values, 5).unwrap();
        let eb = b.embed_values(&values, 5).unwrap();
        // Bit-identical on the CPU; on CUDA two runs may differ in the last bits (cuDNN's
        // algorithm choice), so allow 1e-5 of the unit norm there.
        let tolerance = if device.is_cuda() { 1e-5 } else { 0.0 };
        for (x, y) in ea.concat().iter().zip(&eb.concat()) {
            assert!((x - y).abs() <= tolerance, "{x} vs {y}");
        }
        assert_eq!(ea.len(), 5);
        // Different inputs give different embeddings (the weights are not degenerate).
        assert_ne!(ea[0], ea[1]);

        // The loaded weights equal the saved ones, and eval mode uses running statistics:
        // rebuild the net by hand and compare outputs.
        let mut vs = nn::VarStore::new(device);
        let net = ResNetSmall::from_spec(&vs.root(), &spec);
        vs.load(dir.path().join("model.safetensors")).unwrap();
        let xs = Tensor::from_slice(&values)
            .view([5, 1, 12, 10])
            .to_device(device);
        let direct = tch::no_grad(|| net.forward_t(&xs, false)).unwrap();
        let direct: Vec<f32> = Vec::try_from(&direct.view([-1])).unwrap();
        let flat: Vec<f32> = ea.concat();
        for (x, y) in direct.iter().zip(&flat) {
            assert!((x - y).abs() < 1e-6);
        }
    }

    #[test]
    fn embeddings_have_unit_norm_and_batch_independence() {
        let dir = tempfile::tempdir().unwrap();
        let spec = test_spec(8);
        write_model(dir.path(), &spec);
        let model = LoadedModel::load(dir.path(), test_device()).unwrap();
        let values = inputs(4);
        let all = model.embed_values(&values, 4).unwrap();
        for row in &all {
            assert_eq!(row.len(), 8);
            let norm: f32 = row.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5, "norm {norm}");
        }
        // Eval mode: an item's embedding does not depend on the rest of the batch.
        let single = model.embed_values(&values[120..240], 1).unwrap();
        for (x, y) in single[0].iter().zip(&all[1]) {
            assert!((x - y).abs() < 1e-5);
        }
        assert!(model.embed_values(&[], 0).unwrap().is_empty());
    }

    #[test]
    fn wrong_inputs_and_specs_error() {
        let dir = tempfile::tempdir().unwrap();
        let spec = test_spec(8);
        write_model(dir.path(), &spec);
        let model = LoadedModel::load(dir.path(), Device::Cpu).unwrap();
        assert!(matches!(
            model.embed_values(&[0.0; 100], 1),
            Err(ModelError::Input(_))
        ));
        let wrong = Tensor::zeros([2, 3, 12, 10], (Kind::Float, Device::Cpu));
        assert!(matches!(model.embed(&wrong), Err(ModelError::Input(_))));

        // Spec whose widths disagree with the weights file.
        let mut other = spec.clone();
        other.widths = vec![4, 16];
        other.save(dir.path()).unwrap();
        assert!(matches!(
            LoadedModel::load(dir.path(), Device::Cpu),
            Err(ModelError::Weights { .. })
        ));
        // A weights file with an extra tensor, or one of a broadcastable but wrong shape.
        spec.save(dir.path()).unwrap();
        let path = dir.path().join("model.safetensors");
        let original: Vec<(String, Tensor)> = Tensor::read_safetensors(&path).unwrap();
        let copy = |v: &[(String, Tensor)]| -> Vec<(String, Tensor)> {
            v.iter()
                .map(|(n, t)| (n.clone(), t.shallow_clone()))
                .collect()
        };
        let mut extra = copy(&original);
        extra.push((
            "surplus".into(),
            Tensor::zeros([1], (Kind::Float, Device::Cpu)),
        ));
        Tensor::write_safetensors(&extra, &path).unwrap();
        assert!(matches!(
            LoadedModel::load(dir.path(), Device::Cpu),
            Err(ModelError::Weights { .. })
        ));
        let mut shrunk = copy(&original);
        let i = shrunk
            .iter()
            .position(|(n, _)| n.ends_with("running_mean"))
            .unwrap();
        shrunk[i].1 = Tensor::zeros([1], (Kind::Float, Device::Cpu));
        Tensor::write_safetensors(&shrunk, &path).unwrap();
        let err = LoadedModel::load(dir.path(), Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("shape"), "{err}");
        Tensor::write_safetensors(&original, &path).unwrap();
        assert!(LoadedModel::load(dir.path(), Device::Cpu).is_ok());
        // Values out of bounds are refused with a message naming them, before anything is
        // allocated.
        for (field, edit) in [
            (
                "widths",
                Box::new(|s: &mut ModelSpec| s.widths = vec![4, 100_000])
                    as Box<dyn Fn(&mut ModelSpec)>,
            ),
            (
                "height",
                Box::new(|s: &mut ModelSpec| s.input.height = 100_000),
            ),
            (
                "embedding_dim",
                Box::new(|s: &mut ModelSpec| s.embedding_dim = 10_000_000),
            ),
            (
                "mean",
                Box::new(|s: &mut ModelSpec| s.input.mean = vec![f32::NAN]),
            ),
            (
                "std",
                Box::new(|s: &mut ModelSpec| s.input.std = vec![1e-40]),
            ),
        ] {
            let mut other = spec.clone();
            edit(&mut other);
            other.save(dir.path()).unwrap();
            let err = LoadedModel::load(dir.path(), Device::Cpu).unwrap_err();
            assert!(err.to_string().contains(field), "{field}: {err}");
        }
        // Unknown architecture.
        let mut other = spec.clone();
        other.architecture = "vit".into();
        other.save(dir.path()).unwrap();
        assert!(matches!(
            LoadedModel::load(dir.path(), Device::Cpu),
            Err(ModelError::Unsupported(_))
        ));
        // Missing weights file.
        let mut other = spec.clone();
        other.weights = "missing.safetensors".into();
        other.save(dir.path()).unwrap();
        assert!(matches!(
            LoadedModel::load(dir.path(), Device::Cpu),
            Err(ModelError::Weights { .. })
        ));
        // Unknown keys, at the top and in [input], name themselves.
        let shipped = std::fs::read_to_string(dir.path().join("model.toml")).unwrap();
        for (typo, edited) in [
            ("embeding_dim", format!("embeding_dim = 3\n{shipped}")),
            (
                "chanels",
                shipped.replace("[input]\n", "[input]\nchanels = 3\n"),
            ),
        ] {
            assert_ne!(edited, shipped);
            std::fs::write(dir.path().join("model.toml"), edited).unwrap();
            match LoadedModel::load(dir.path(), Device::Cpu) {
                Err(ModelError::Spec(e)) => assert!(e.to_string().contains(typo), "{e}"),
                other => panic!("{typo}: {other:?}"),
            }
        }
        // No model.toml at all.
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            LoadedModel::load(empty.path(), Device::Cpu),
            Err(ModelError::Spec(_))
        ));
    }

    #[test]
    fn devices_parse() {
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        assert_eq!(parse_device(" CPU ").unwrap(), Device::Cpu);
        let auto = parse_device("auto").unwrap();
        if tch::Cuda::is_available() {
            assert_eq!(auto, Device::Cuda(0));
        } else {
            assert_eq!(auto, Device::Cpu);
            assert!(matches!(parse_device("cuda:0"), Err(ModelError::Device(_))));
        }
        assert!(matches!(
            parse_device("cuda:999"),
            Err(ModelError::Device(_))
        ));
        assert!(matches!(parse_device("gpu"), Err(ModelError::Device(_))));
        assert!(matches!(parse_device("cuda:x"), Err(ModelError::Device(_))));
    }

    /// Exports a tiny TorchScript module with the project's Python (skipped when torch
    /// cannot be imported) and checks that we load it and normalise its output.
    #[test]
    fn torchscript_model_loads_and_is_normalised() {
        let dir = tempfile::tempdir().unwrap();
        let pt = dir.path().join("model.pt");
        let returns = "torch.stack([f.sum(1), f[:, 0] * 3.0, torch.ones_like(f[:, 0])], 1)";
        if !test_support::export_flat_torchscript(returns, &pt) {
            return;
        }
        let mut spec = test_spec(3);
        spec.format = ModelFormat::Torchscript;
        spec.architecture = "test-sum".into();
        spec.widths = vec![];
        spec.input.height = 2;
        spec.input.width = 2;
        spec.weights = "model.pt".into();
        spec.save(dir.path()).unwrap();
        let model = LoadedModel::load(dir.path(), test_device()).unwrap();
        let out = model
            .embed_values(&[1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0], 2)
            .unwrap();
        // Row 1: (4, 3, 1) / sqrt(26); row 2: (0, 0, 1).
        let s = 26f32.sqrt();
        let expected = [[4.0 / s, 3.0 / s, 1.0 / s], [0.0, 0.0, 1.0]];
        for (row, want) in out.iter().zip(expected) {
            for (x, y) in row.iter().zip(want) {
                assert!((x - y).abs() < 1e-6, "{row:?} vs {want:?}");
            }
        }
    }
}
