//! Generates the gRPC code with a vendored `protoc`, so no system package is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        // Small per-stream buffers: see `codec.rs`.
        .codec_path("crate::codec::LeanCodec")
        .compile_with_config(config, &["gantry.proto", "raft.proto"], &["."])?;
    println!("cargo:rerun-if-changed=gantry.proto");
    println!("cargo:rerun-if-changed=raft.proto");
    println!("cargo:rerun-if-changed=src/codec.rs");
    Ok(())
}
