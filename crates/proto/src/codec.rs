//! The gRPC codec of every Antar service: prost, except that a message that
//! does not decode is the caller's fault, so it is answered with
//! `INVALID_ARGUMENT` (DESIGN.md §9) rather than tonic's `INTERNAL`.

use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// [`ProstCodec`] with decode errors mapped to `INVALID_ARGUMENT`.
#[derive(Debug, Clone, Default)]
pub struct AntarCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Codec for AntarCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = AntarDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        AntarDecoder(self.0.decoder())
    }
}

/// Decodes with prost; a malformed message is `INVALID_ARGUMENT`.
#[derive(Debug)]
pub struct AntarDecoder<U>(ProstDecoder<U>);

impl<U: prost::Message + Default> Decoder for AntarDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0
            .decode(buf)
            .map_err(|s| Status::invalid_argument(format!("malformed protobuf message: {}", s.message())))
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
