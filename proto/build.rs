//! Generates the tonic/prost code from `proto/*.proto` (needs `protoc`; the
//! scripts install Debian's `protobuf-compiler` when it is missing).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure().compile_protos(&["proto/clawdeploy.proto"], &["proto"])?;
    Ok(())
}
