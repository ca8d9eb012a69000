//! Labelled image datasets: IDX files (MNIST / Fashion-MNIST) and image folders.
pub mod glyphs;
use std::io::Read;
use std::path::{Path, PathBuf};

use image::{DynamicImage, GrayImage};

/// On-disk layout of a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DatasetFormat {
    /// An IDX image file (`PATH`, magic 0x803) and its IDX label file (`--labels`, 0x801),
    /// gzip-compressed or not.
    Idx,
    /// `PATH/CLASS/*.png|jpg|jpeg`; the class directory name is the label.
    Imagefolder,
}

/// Command-line arguments selecting a dataset.
#[derive(Debug, Clone, clap::Args)]
pub struct DatasetArgs {
    /// Dataset layout.
    #[arg(long, value_enum, default_value = "idx")]
    pub format: DatasetFormat,
    /// IDX label file (default: PATH with `images-idx3` replaced by `labels-idx1`).
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// Keep only the first N samples.
    #[arg(long)]
    pub limit: Option<usize>,
    /// IDX image file, or the root directory of an image folder.
    pub path: PathBuf,
}

/// One labelled image.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Class label (for IDX the label number, e.g. `"3"`).
    pub label: String,
    /// The image.
    pub image: DynamicImage,
}

/// A labelled image dataset in a deterministic order.
#[derive(Debug, Clone, Default)]
pub struct Dataset {
    /// The samples.
    pub samples: Vec<Sample>,
}

impl Dataset {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The labels in sample order.
    pub fn labels(&self) -> Vec<String> {
        self.samples.iter().map(|s| s.label.clone()).collect()
    }
}

/// Errors reading a dataset.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file or directory could not be read.
    #[error("{path}: {source}")]
    Io {
        /// Path involved.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A file's contents are not what the format requires.
    #[error("{path}: {message}")]
    Invalid {
        /// Path involved.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The arguments do not describe a readable dataset.
    #[error("{0}")]
    Args(String),
}

/// Loads the dataset the arguments describe.
pub fn load(args: &DatasetArgs) -> Result<Dataset, DataError> {
    let dataset = match args.format {
        DatasetFormat::Idx => {
            let labels = match &args.labels {
                Some(path) => path.clone(),
                None => default_label_path(&args.path).ok_or_else(|| {
                    DataError::Args(format!(
                        "--labels is required: cannot derive a label file from {}",
                        args.path.display()
                    ))
                })?,
            };
            load_idx(&args.path, &labels, args.limit)?
        }
        DatasetFormat::Imagefolder => {
            if args.labels.is_some() {
                return Err(DataError::Args(
                    "--labels is only used with --format idx (image folders take labels from directory names)".into(),
                ));
            }
            load_image_folder(&args.path, args.limit)?
        }
    };
    if dataset.is_empty() {
        return Err(DataError::Args(format!(
            "{}: the dataset is empty",
            args.path.display()
        )));
    }
    Ok(dataset)
}

/// `…images-idx3…` → `…labels-idx1…`, when the file name follows the MNIST convention.
fn default_label_path(images: &Path) -> Option<PathBuf> {
    let name = images.file_name()?.to_str()?;
    if !name.contains("images-idx3") {
        return None;
    }
    Some(images.with_file_name(name.replace("images-idx3", "labels-idx1")))
}

/// Reads a file, transparently gunzipping it when it starts with the gzip magic bytes.
fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, DataError> {
    let io = |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    let raw = std::fs::read(path).map_err(io)?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(io)?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parses an IDX header with the expected magic number; returns the dimensions and the data.
fn parse_idx<'a>(
    bytes: &'a [u8],
    path: &Path,
    magic: u32,
    what: &str,
) -> Result<(Vec<usize>, &'a [u8]), DataError> {
    let invalid = |message: String| DataError::Invalid {
        path: path.to_path_buf(),
        message,
    };
    if bytes.len() < 4 {
        return Err(invalid(format!("too short for an IDX {what} file")));
    }
    let found = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    if found != magic {
        return Err(invalid(format!(
            "not an IDX {what} file: magic number {found:#010x}, expected {magic:#010x}"
        )));
    }
    let ndim = (magic & 0xff) as usize;
    let header = 4 + 4 * ndim;
    if bytes.len() < header {
        return Err(invalid(format!("truncated IDX {what} header")));
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|i| {
            let o = 4 + 4 * i;
            u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize
        })
        .collect();
    let expected = dims
        .iter()
        .try_fold(1usize, |total, &d| total.checked_mul(d))
        .ok_or_else(|| invalid(format!("IDX {what} dimensions {dims:?} overflow")))?;
    let data = &bytes[header..];
    if data.len() != expected {
        return Err(invalid(format!(
            "IDX {what} file with dimensions {dims:?} needs {expected} data bytes, found {}",
            data.len()
        )));
    }
    Ok((dims, data))
}

/// Reads an IDX image file (magic 0x803) and label file (magic 0x801).
pub fn load_idx(images: &Path, labels: &Path, limit: Option<usize>) -> Result<Dataset, DataError> {
    let image_bytes = read_maybe_gz(images)?;
    let label_bytes = read_maybe_gz(labels)?;
    let (dims, pixels) = parse_idx(&image_bytes, images, 0x0803, "image")?;
    let (label_dims, label_data) = parse_idx(&label_bytes, labels, 0x0801, "label")?;
    let (n, rows, cols) = (dims[0], dims[1], dims[2]);
    if label_dims[0] != n {
        return Err(DataError::Invalid {
            path: labels.to_path_buf(),
            message: format!(
                "{} labels for {n} images in {}",
                label_dims[0],
                images.display()
            ),
        });
    }
    if n > 0 && (rows == 0 || cols == 0) {
        return Err(DataError::Invalid {
            path: images.to_path_buf(),
            message: format!("images of size {rows}×{cols}"),
        });
    }
    let keep = limit.map_or(n, |l| l.min(n));
    let plane = rows * cols;
    let mut samples = Vec::with_capacity(keep);
    for (i, label) in label_data.iter().take(keep).enumerate() {
        let raw = pixels[i * plane..(i + 1) * plane].to_vec();
        let gray = GrayImage::from_raw(cols as u32, rows as u32, raw).ok_or_else(|| {
            DataError::Invalid {
                path: images.to_path_buf(),
                message: format!("image {i} has the wrong size"),
            }
        })?;
        samples.push(Sample {
            label: label.to_string(),
            image: DynamicImage::ImageLuma8(gray),
        });
    }
    Ok(Dataset { samples })
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let io = |source| DataError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut entries = std::fs::read_dir(dir)
        .map_err(io)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(io)?;
    entries.sort();
    Ok(entries)
}

fn is_image_file(path: &Path) -> bool {
    path.is_file()
        && path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
}

/// Reads `root/CLASS/*.png|jpg|jpeg`, classes and files in sorted order; hidden folders
/// (named `.…`, such as `.git`) are not classes.
pub fn load_image_folder(root: &Path, limit: Option<usize>) -> Result<Dataset, DataError> {
    let keep = limit.unwrap_or(usize::MAX);
    let mut samples = Vec::new();
    for class_dir in sorted_entries(root)? {
        let label = class_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !class_dir.is_dir() || label.starts_with('.') {
            continue;
        }
        for file in sorted_entries(&class_dir)? {
            if samples.len() >= keep {
                return Ok(Dataset { samples });
            }
            if !is_image_file(&file) {
                continue;
            }
            let image = image::open(&file).map_err(|e| DataError::Invalid {
                path: file.clone(),
                message: e.to_string(),
            })?;
            samples.push(Sample {
                label: label.clone(),
                image,
            });
        }
    }
    Ok(Dataset { samples })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn idx_images(n: usize, rows: usize, cols: usize) -> Vec<u8> {
        let mut out = vec![0, 0, 8, 3];
        for d in [n, rows, cols] {
            out.extend_from_slice(&(d as u32).to_be_bytes());
        }
        out.extend((0..n * rows * cols).map(|i| (i % 251) as u8));
        out
    }

    fn idx_labels(labels: &[u8]) -> Vec<u8> {
        let mut out = vec![0, 0, 8, 1];
        out.extend_from_slice(&(labels.len() as u32).to_be_bytes());
        out.extend_from_slice(labels);
        out
    }

    fn gz(bytes: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    fn args(format: DatasetFormat, path: PathBuf, labels: Option<PathBuf>) -> DatasetArgs {
        DatasetArgs {
            format,
            labels,
            limit: None,
            path,
        }
    }

    #[test]
    fn idx_plain_and_gz_read_identically() {
        let dir = tempfile::tempdir().unwrap();
        let images = idx_images(3, 2, 4);
        let labels = idx_labels(&[7, 0, 3]);
        std::fs::write(dir.path().join("x-images-idx3-ubyte"), &images).unwrap();
        std::fs::write(dir.path().join("x-labels-idx1-ubyte"), &labels).unwrap();
        std::fs::write(dir.path().join("x-images-idx3-ubyte.gz"), gz(&images)).unwrap();
        std::fs::write(dir.path().join("x-labels-idx1-ubyte.gz"), gz(&labels)).unwrap();
        for suffix in ["", ".gz"] {
            // Label file derived from the image file name.
            let a = args(
                DatasetFormat::Idx,
                dir.path().join(format!("x-images-idx3-ubyte{suffix}")),
                None,
            );
            let ds = load(&a).unwrap();
            assert_eq!(ds.labels(), vec!["7", "0", "3"]);
            let img = ds.samples[1].image.to_luma8();
            assert_eq!((img.width(), img.height()), (4, 2));
            let expected: Vec<u8> = (8..16).collect();
            assert_eq!(img.as_raw(), &expected);
        }
        // --limit keeps the first N.
        let mut a = args(
            DatasetFormat::Idx,
            dir.path().join("x-images-idx3-ubyte.gz"),
            Some(dir.path().join("x-labels-idx1-ubyte")),
        );
        a.limit = Some(2);
        assert_eq!(load(&a).unwrap().labels(), vec!["7", "0"]);
    }

    #[test]
    fn idx_errors_are_clear() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        std::fs::write(p("img"), idx_images(3, 2, 2)).unwrap();
        std::fs::write(p("lab"), idx_labels(&[1, 2, 3])).unwrap();
        std::fs::write(p("lab2"), idx_labels(&[1, 2])).unwrap();
        let mut truncated = idx_images(3, 2, 2);
        truncated.pop();
        std::fs::write(p("trunc"), truncated).unwrap();
        // Dimensions whose product wraps to 0 in 64 bits, with no data at all.
        let mut overflowing = vec![0, 0, 8, 3];
        for d in [1u32 << 22, 1 << 21, 1 << 21] {
            overflowing.extend_from_slice(&d.to_be_bytes());
        }
        std::fs::write(p("huge"), overflowing).unwrap();

        let err = |images: &str, labels: &str| {
            load(&args(DatasetFormat::Idx, p(images), Some(p(labels))))
                .unwrap_err()
                .to_string()
        };
        assert!(err("lab", "lab").contains("magic number"));
        assert!(err("img", "img").contains("magic number"));
        assert!(err("img", "lab2").contains("2 labels for 3 images"));
        assert!(err("trunc", "lab").contains("needs 12 data bytes, found 11"));
        assert!(
            err("huge", "lab").contains("overflow"),
            "{}",
            err("huge", "lab")
        );
        assert!(err("img", "missing").contains("missing"));
        assert!(load(&args(DatasetFormat::Idx, p("img"), Some(p("lab")))).is_ok());
        // No --labels and no derivable name.
        assert!(matches!(
            load(&args(DatasetFormat::Idx, p("img"), None)),
            Err(DataError::Args(_))
        ));
    }

    #[test]
    fn image_folder_is_sorted_and_labelled_by_directory() {
        let dir = tempfile::tempdir().unwrap();
        for (class, files) in [("b", vec!["2.png", "1.jpg"]), ("a", vec!["z.png"])] {
            std::fs::create_dir(dir.path().join(class)).unwrap();
            for (i, f) in files.iter().enumerate() {
                let img = image::RgbImage::from_pixel(3, 2, image::Rgb([i as u8 * 100, 5, 9]));
                img.save(dir.path().join(class).join(f)).unwrap();
            }
        }
        std::fs::write(dir.path().join("b").join("notes.txt"), "x").unwrap();
        std::fs::write(dir.path().join("README"), "x").unwrap();
        // A hidden folder with an image in it is not a class.
        std::fs::create_dir(dir.path().join(".cache")).unwrap();
        image::RgbImage::new(3, 2)
            .save(dir.path().join(".cache").join("thumb.png"))
            .unwrap();
        let a = args(DatasetFormat::Imagefolder, dir.path().to_path_buf(), None);
        let ds = load(&a).unwrap();
        assert_eq!(ds.labels(), vec!["a", "b", "b"]);
        // Within "b": 1.jpg (written second, red 100) sorts before 2.png (red 0).
        assert!(ds.samples[1].image.to_rgb8().get_pixel(0, 0)[0] > 80);
        assert_eq!(ds.samples[2].image.to_rgb8().get_pixel(0, 0)[0], 0);
        let mut limited = a.clone();
        limited.limit = Some(2);
        assert_eq!(load(&limited).unwrap().labels(), vec!["a", "b"]);
        let mut with_labels = a.clone();
        with_labels.labels = Some(dir.path().join("README"));
        assert!(matches!(load(&with_labels), Err(DataError::Args(_))));
        let empty = tempfile::tempdir().unwrap();
        assert!(load(&args(
            DatasetFormat::Imagefolder,
            empty.path().to_path_buf(),
            None
        ))
        .is_err());
    }
}
