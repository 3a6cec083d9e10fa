//! Lists `../migrations` for `src/db.rs`, which embeds each file with
//! `include_str!` (the generated `$OUT_DIR/migrations.rs`); a new
//! migration file rebuilds the crate.
use std::fmt::Write;

fn main() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("the migrations directory")
        .map(|e| e.expect("a migrations entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "sql"))
        .collect();
    files.sort();
    let mut out = String::from("&[\n");
    for path in files {
        let name = path.file_name().expect("a file name").to_string_lossy();
        let path = path.canonicalize().expect("a migration's path");
        writeln!(out, "    ({name:?}, include_str!({:?})),", path.display()).expect("a string");
    }
    out.push(']');
    let target =
        std::path::Path::new(&std::env::var("OUT_DIR").expect("OUT_DIR")).join("migrations.rs");
    std::fs::write(target, out).expect("writing migrations.rs");
}
