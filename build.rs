//! Link fix for libtorch from a PyPI wheel.
//!
//! torch-sys links `libtorch_cuda.so`, but the linker's `--as-needed` drops it because no
//! symbol of it is referenced directly; CUDA is then never initialised. We force it in with
//! `--no-as-needed` (when the wheel has it) and add an rpath to torch's library directory so
//! the binary, tests and benches run without `LD_LIBRARY_PATH`.
use std::path::PathBuf;
use std::process::Command;

/// torch's library directory, found in the order torch-sys uses, so that the rpath and the
/// CUDA library name the libtorch the binary links: the Python package when
/// `LIBTORCH_USE_PYTORCH` is set, else `LIBTORCH_LIB` or `LIBTORCH`, else the Python package.
fn torch_lib_dir() -> Option<PathBuf> {
    if std::env::var_os("LIBTORCH_USE_PYTORCH").is_none() {
        if let Some(lib) = std::env::var_os("LIBTORCH_LIB").or_else(|| std::env::var_os("LIBTORCH"))
        {
            return Some(PathBuf::from(lib).join("lib"));
        }
    }
    let python = if std::env::var_os("VIRTUAL_ENV").is_some() {
        "python"
    } else {
        "python3"
    };
    let output = Command::new(python)
        .args([
            "-c",
            "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))",
        ])
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    let dir = String::from_utf8(output.stdout).ok()?;
    Some(PathBuf::from(dir.trim()))
}

fn main() {
    for variable in ["LIBTORCH", "LIBTORCH_LIB", "LIBTORCH_USE_PYTORCH"] {
        println!("cargo:rerun-if-env-changed={variable}");
    }
    println!("cargo:rerun-if-env-changed=VIRTUAL_ENV");
    println!("cargo:rerun-if-changed=build.rs");
    let Some(lib_dir) = torch_lib_dir() else {
        println!("cargo:warning=torch library directory not found; no rpath or CUDA link fix");
        return;
    };
    println!("cargo:rustc-link-arg=-L{}", lib_dir.display());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    if lib_dir.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
