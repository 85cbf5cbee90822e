//! W3C Trace Context (`traceparent`) for envelopes: an app may pass one in
//! the gRPC metadata of `Send`, `Call` or `Reply`; otherwise the node starts
//! a trace. Every hop continues it with a new span id in
//! `EnvelopeTransfer.traceparent`, and logs about an envelope carry its
//! `trace_id`, so one search follows an envelope across agencies.

use rand::Rng as _;
use tonic::metadata::MetadataMap;

/// The `traceparent` of a new envelope: the caller's trace continued, or a new one.
pub(crate) fn from_metadata(meta: &MetadataMap) -> String {
    match meta.get("traceparent").and_then(|v| v.to_str().ok()) {
        Some(tp) if valid(tp) => child(tp),
        _ => {
            let mut rng = rand::rng();
            format!(
                "00-{:032x}-{:016x}-01",
                rng.random::<u128>() | 1,
                rng.random::<u64>() | 1
            )
        }
    }
}

/// The same trace with a new span id (one per hop); a new trace if `tp` is invalid.
pub(crate) fn child(tp: &str) -> String {
    if !valid(tp) {
        return from_metadata(&MetadataMap::new());
    }
    format!(
        "00-{}-{:016x}-{}",
        trace_id(tp),
        rand::rng().random::<u64>() | 1,
        &tp[53..55]
    )
}

/// The 32-hex trace id of a valid `traceparent`, else "".
pub(crate) fn trace_id(tp: &str) -> &str {
    if valid(tp) {
        &tp[3..35]
    } else {
        ""
    }
}

/// `00-<32 hex, not all 0>-<16 hex, not all 0>-<2 hex>`.
fn valid(tp: &str) -> bool {
    let b = tp.as_bytes();
    let hex = |r: std::ops::Range<usize>| {
        b[r.clone()].iter().all(u8::is_ascii_hexdigit) && !b[r].iter().all(|c| *c == b'0')
    };
    b.len() == 55
        && tp.starts_with("00-")
        && b[35] == b'-'
        && b[52] == b'-'
        && hex(3..35)
        && hex(36..52)
        && b[53..55].iter().all(u8::is_ascii_hexdigit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continues_a_valid_trace_and_replaces_a_bad_one() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut meta = MetadataMap::new();
        meta.insert("traceparent", tp.parse().unwrap());
        let next = from_metadata(&meta);
        assert_eq!(trace_id(&next), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(next, tp, "a new span id per hop");
        assert!(valid(&next) && valid(&child(&next)));
        meta.insert("traceparent", "00-zz-00-01".parse().unwrap());
        let fresh = from_metadata(&meta);
        assert!(valid(&fresh));
        assert_eq!(trace_id("garbage"), "");
    }
}
