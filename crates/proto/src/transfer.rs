//! `Peer.Transfer` from the sending side, with each item sent as the bytes
//! the node stored, not encoded again from a decoded copy.
//!
//! [`TransferBatchBytes`] is `TransferBatch` on the wire: a repeated
//! embedded message and a repeated `bytes` field are both length-delimited
//! field 1, so the peer decodes it as `TransferBatch` and nothing on the
//! wire changes. Each item is a `TransferItem` as queued (`seq` 0, so not
//! encoded) after its `seq` field ([`item_bytes`]).

use tonic::codegen::http::uri::PathAndQuery;
use tonic::codegen::{Body, Bytes, StdError};

use prost::Message;

use crate::codec::AntarCodec;
use crate::v1::{TransferAck, TransferItem};

/// A `TransferBatch` whose items are already encoded `TransferItem`s.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TransferBatchBytes {
    /// Encoded `TransferItem`s, `seq` included.
    #[prost(bytes = "vec", repeated, tag = "1")]
    pub items: Vec<Vec<u8>>,
}

/// `TransferItem.seq`'s key: field 1, varint.
const SEQ_KEY: u8 = 0x08;

/// The encoded `TransferItem` that `item`, an encoded `TransferItem` without
/// a `seq`, is with `seq` set: `item` after the `seq` field.
///
/// `item` is decoded first, only to check that it does, to its last nested
/// field: the peer decodes a batch whole, so one item that does not would
/// make it refuse the batch, again at every retry, and this peer's queue
/// would never move. Such an item (or one with a `seq` already) goes as it
/// decodes, empty when it does not, and the peer refuses it alone.
pub fn item_bytes(seq: u64, item: &[u8]) -> Vec<u8> {
    let typed = match TransferItem::decode(item) {
        Ok(typed) if typed.seq == 0 => {
            let mut out = Vec::with_capacity(1 + prost::encoding::encoded_len_varint(seq) + item.len());
            // As prost writes it: a zero `seq` is left out.
            if seq != 0 {
                out.push(SEQ_KEY);
                prost::encoding::encode_varint(seq, &mut out);
            }
            out.extend_from_slice(item);
            return out;
        }
        decoded => decoded,
    };
    TransferItem {
        seq,
        ..typed.unwrap_or_default()
    }
    .encode_to_vec()
}

/// Opens `Peer.Transfer` on `grpc` with `batches` as the request stream,
/// as `PeerClient::transfer` does for `TransferBatch`es.
///
/// # Errors
/// The status of a connection that is not ready or a call the peer refused.
pub async fn transfer<T>(
    grpc: &mut tonic::client::Grpc<T>,
    batches: impl tonic::IntoStreamingRequest<Message = TransferBatchBytes>,
) -> Result<tonic::Response<tonic::codec::Streaming<TransferAck>>, tonic::Status>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<StdError>,
    T::ResponseBody: Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as Body>::Error: Into<StdError> + Send,
{
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unknown(format!("Service was not ready: {}", e.into())))?;
    let mut req = batches.into_streaming_request();
    req.extensions_mut()
        .insert(tonic::GrpcMethod::new("antar.v1.Peer", "Transfer"));
    grpc.streaming(
        req,
        PathAndQuery::from_static("/antar.v1.Peer/Transfer"),
        AntarCodec::default(),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{transfer_item, EnvelopeTransfer, ReceiptTransfer, TransferBatch};

    #[test]
    fn stored_items_with_their_seq_are_a_transfer_batch_on_the_wire() {
        let items = [
            TransferItem {
                seq: 0,
                item: Some(transfer_item::Item::Envelope(EnvelopeTransfer {
                    hops: vec!["finance".into()],
                    traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
                    ..Default::default()
                })),
            },
            TransferItem {
                seq: 0,
                item: Some(transfer_item::Item::Receipt(ReceiptTransfer {
                    hops: vec!["health".into(), "hub".into()],
                    ..Default::default()
                })),
            },
        ];
        // Sequence numbers of one byte, of several, and the largest.
        let seqs = [5u64, 300, u64::MAX];
        let raw = TransferBatchBytes {
            items: items
                .iter()
                .cycle()
                .zip(seqs)
                .map(|(item, seq)| item_bytes(seq, &item.encode_to_vec()))
                .collect(),
        };
        let decoded = TransferBatch::decode(raw.encode_to_vec().as_slice()).unwrap();
        let expected: Vec<TransferItem> = items
            .iter()
            .cycle()
            .zip(seqs)
            .map(|(item, seq)| TransferItem { seq, ..item.clone() })
            .collect();
        assert_eq!(decoded.items, expected);
        // Byte for byte what prost writes for the same batch.
        let typed = TransferBatch { items: expected };
        assert_eq!(raw.encode_to_vec(), typed.encode_to_vec());
    }

    #[test]
    fn an_item_that_decodes_goes_as_stored_not_encoded_again() {
        // A field this build does not know (tag 15, varint 1) after the
        // item: prost skips it in decoding and would not write it again.
        let mut stored = TransferItem {
            seq: 0,
            item: Some(transfer_item::Item::Receipt(ReceiptTransfer::default())),
        }
        .encode_to_vec();
        stored.extend_from_slice(&[0x78, 0x01]);
        assert_eq!(
            item_bytes(300, &stored),
            [&[0x08, 0xac, 0x02][..], &stored].concat()
        );
        assert_eq!(item_bytes(0, &stored), stored);
    }

    #[test]
    fn an_item_that_does_not_decode_goes_empty_and_alone() {
        let receipt = TransferItem {
            seq: 0,
            item: Some(transfer_item::Item::Receipt(ReceiptTransfer::default())),
        };
        // Garbage; a truncated item; a `receipt` field whose inside does
        // not decode; one with a `seq` already; an empty one.
        let mut truncated = receipt.encode_to_vec();
        truncated.pop();
        let with_seq = TransferItem {
            seq: 9,
            ..receipt.clone()
        }
        .encode_to_vec();
        let cases: [(&[u8], Option<transfer_item::Item>); 5] = [
            (&[0xff, 0xff, 0xff], None),
            (&truncated, None),
            (&[0x1a, 0x01, 0xff], None),
            (&with_seq, receipt.item.clone()),
            (&[], None),
        ];
        for (i, (bytes, item)) in cases.into_iter().enumerate() {
            let seq = 40 + i as u64;
            let raw = TransferBatchBytes {
                items: vec![item_bytes(seq, bytes), item_bytes(7, &receipt.encode_to_vec())],
            };
            let decoded = TransferBatch::decode(raw.encode_to_vec().as_slice()).unwrap();
            assert_eq!(decoded.items[0], TransferItem { seq, item }, "case {i}");
            assert_eq!(
                decoded.items[1],
                TransferItem {
                    seq: 7,
                    ..receipt.clone()
                },
                "case {i}"
            );
        }
    }
}
