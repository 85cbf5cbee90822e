//! Conversions between `SystemTime` and protobuf timestamps.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A protobuf timestamp for `t` (times before 1970 clamp to the epoch).
pub fn to_timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// The `SystemTime` of a protobuf timestamp (negative or malformed ones clamp to the epoch).
pub fn from_timestamp(ts: &prost_types::Timestamp) -> SystemTime {
    let secs = u64::try_from(ts.seconds).unwrap_or(0);
    let nanos = u32::try_from(ts.nanos).unwrap_or(0).min(999_999_999);
    UNIX_EPOCH + Duration::new(secs, nanos)
}

/// Milliseconds since the Unix epoch.
pub fn unix_millis(t: SystemTime) -> u64 {
    u64::try_from(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis()).unwrap_or(u64::MAX)
}
