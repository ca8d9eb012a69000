//! Link fix for libtorch from a PyPI wheel.
//!
//! torch-sys links `libtorch_cuda.so`, but the linker's `--as-needed` drops it because no
//! symbol of it is referenced directly; CUDA is then never initialised. We force it in with
//! `--no-as-needed` (when the wheel has it) and add an rpath to torch's library directory so
//! the binary, tests and benches run without `LD_LIBRARY_PATH`.
use std::path::PathBuf;

fn main() {
    // torch-sys publishes the libtorch directory it linked (its `links = "tch"` metadata), so
    // the rpath and the CUDA library name exactly that libtorch, however it was found.
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-changed=build.rs");
    let Some(lib_dir) = std::env::var_os("DEP_TCH_LIBTORCH_LIB").map(PathBuf::from) else {
        println!("cargo:warning=torch-sys did not report its library directory; no rpath or CUDA link fix");
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
