//! Generates the gRPC code with a vendored `protoc`, so no system package is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    // The storage format's maps are the domain's `BTreeMap`s (ordered, so
    // an encoding is a function of the value).
    config.btree_map([".gantry.storage.v1"]);
    tonic_prost_build::configure()
        // Small per-stream buffers: see `codec.rs`.
        .codec_path("crate::codec::LeanCodec")
        .compile_with_config(
            config,
            &["gantry.proto", "raft.proto", "storage.proto"],
            &["."],
        )?;
    println!("cargo:rerun-if-changed=gantry.proto");
    println!("cargo:rerun-if-changed=raft.proto");
    println!("cargo:rerun-if-changed=storage.proto");
    println!("cargo:rerun-if-changed=src/codec.rs");
    Ok(())
}
