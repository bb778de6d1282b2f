//! Generates the gRPC code from `proto/` with protox, so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["kms_v2.proto", "kms_v1beta1.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .bytes(".")
        // A request that does not decode is InvalidArgument, not tonic's Internal.
        .codec_path("crate::service::codec::StrictCodec")
        .compile_fds(fds)?;
    // `kms-plugin inventory`: a client for etcd's KV.Range only (proto/etcd says where the
    // trimmed files come from), with tonic's ordinary codec: etcd's replies are not requests
    // this plugin judges. The server side is for the tests' fake etcd (replies a real one
    // never gives); the binary never serves it.
    let etcd = protox::compile(["etcd/rpc.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(etcd)?;
    Ok(())
}
