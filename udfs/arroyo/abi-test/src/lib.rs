//! Calls a built Arroyo UDF plugin the way Arroyo does: load the cdylib, hand `__run` the
//! argument arrays over the Arrow C data interface, read the result array back.

use std::path::{Path, PathBuf};

use arrow::array::{make_array, ArrayData, ArrayRef};
use arrow::ffi::from_ffi;
use arroyo_udf_common::{FfiArrays, RunResult};

/// Where cargo put the plugin of `function` (`libebb_arroyo_<function>.so` on Linux).
pub fn plugin_path(function: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    target.join(profile).join(format!(
        "{}ebb_arroyo_{function}{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ))
}

/// A loaded plugin. It is never unloaded: arrays it returns carry release callbacks that
/// live in its code, so unloading it while one is alive would jump into freed memory (Arroyo
/// keeps its plugins loaded for the same reason).
pub struct Plugin {
    lib: std::mem::ManuallyDrop<libloading::Library>,
}

type Run = unsafe extern "C-unwind" fn(FfiArrays) -> RunResult;

impl Plugin {
    /// Loads the plugin at `path`.
    pub fn load(path: &Path) -> Result<Self, String> {
        // SAFETY: the library is one of ebb's own plugins, built by this workspace; loading it
        // runs no initialisers beyond Rust's.
        let lib = unsafe { libloading::Library::new(path) }
            .map_err(|e| format!("{}: {e} (build the plugins first: cargo build --manifest-path udfs/arroyo/Cargo.toml)", path.display()))?;
        Ok(Self {
            lib: std::mem::ManuallyDrop::new(lib),
        })
    }

    /// Calls the plugin's `__run` on `args`.
    pub fn call(&self, args: Vec<ArrayData>) -> Result<ArrayRef, String> {
        // SAFETY: `__run` has exactly this signature in every plugin arroyo-udf-plugin 0.2
        // generates, and this crate links the same arroyo-udf-common for the FFI types.
        let run: libloading::Symbol<'_, Run> =
            unsafe { self.lib.get(b"__run") }.map_err(|e| e.to_string())?;
        // SAFETY: the arrays are valid Arrow data; the plugin takes ownership of them.
        match unsafe { run(FfiArrays::from_vec(args)) } {
            RunResult::Ok(out) => {
                // SAFETY: the plugin exported a valid array and schema, now ours to import.
                let data = unsafe { from_ffi(out.0, &out.1) }.map_err(|e| e.to_string())?;
                Ok(make_array(data))
            }
            RunResult::Err => Err("the UDF panicked".into()),
        }
    }
}
