//! The protobuf codec of the gRPC surface: prost's, except that a request that does not decode
//! (a string that is not UTF-8, a wrong wire type, a truncated varint) is the caller's error,
//! `InvalidArgument`, where tonic's default says `Internal`.

use std::marker::PhantomData;

use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::ProstEncoder;

/// The codec named in `build.rs` for every generated service and client.
#[derive(Debug, Clone)]
pub struct StrictCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for StrictCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for StrictCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = StrictDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(buffers())
    }

    fn decoder(&mut self) -> Self::Decoder {
        StrictDecoder(PhantomData)
    }
}

/// Decodes with prost; a decode failure is `InvalidArgument` naming the field prost names.
#[derive(Debug, Clone)]
pub struct StrictDecoder<U>(PhantomData<U>);

impl<U: prost::Message + Default> Decoder for StrictDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf)
            .map(Some)
            .map_err(|e| crate::error::Error::Protobuf(e.to_string()).to_status())
    }

    fn buffer_settings(&self) -> BufferSettings {
        buffers()
    }
}

/// Every message here is well under 2 KiB: a 2 KiB buffer per call (tonic's default is 8 KiB,
/// which a peer holding thousands of calls open would multiply).
fn buffers() -> BufferSettings {
    BufferSettings::new(2 * 1024, 32 * 1024)
}
