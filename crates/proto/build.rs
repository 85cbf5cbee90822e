//! Compiles `proto/antar/v1/*.proto` with protox (pure Rust, no system protoc).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time, not baked in with `env!`: a build script compiled
    // for a checkout elsewhere (a shared target directory) still finds this
    // checkout's protos.
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = ["agency", "envelope", "peer", "admin", "audit"]
        .map(|name| root.join(format!("antar/v1/{name}.proto")));
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    let fds = protox::compile(&files, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("antar_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .codec_path("crate::codec::AntarCodec")
        // Every `bytes` field is a `bytes::Bytes`: decoded from a received
        // buffer it is a slice of it, not a copy, and a signature, header
        // or certificate shared by a batch is cloned by a reference count.
        // Allocations were a fifth of the node's CPU (docs/benchmarks.md).
        .bytes(".")
        .compile_fds(fds)?;
    Ok(())
}
