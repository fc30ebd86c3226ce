//! Checksummed values: every value this node writes to sled is a 4-byte
//! CRC32 (little-endian) of the payload, followed by the bincode payload.
//!
//! Reading a value checks the CRC before decoding, so a damaged value is
//! reported as [`BadValue::Checksum`] instead of decoding into something
//! else or panicking. Keys are not covered by the CRC; the readers check
//! that each value belongs to its key (a log entry's index, an instance's
//! service and id).

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The length of the checksum prefix.
pub const CRC_LEN: usize = 4;

/// Why a stored value cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum BadValue {
    #[error("checksum mismatch")]
    Checksum,
    #[error("value of {0} bytes is too short to hold a checksum")]
    TooShort(usize),
    #[error("checksum valid but the value does not decode ({0})")]
    Decode(bincode::Error),
}

/// What is corrupt and why, e.g. `log entry 1234: checksum mismatch`.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {why}")]
pub struct Corruption {
    pub what: String,
    pub why: String,
}

impl Corruption {
    pub fn new(what: impl Into<String>, why: impl std::fmt::Display) -> Self {
        Self {
            what: what.into(),
            why: why.to_string(),
        }
    }
}

/// sled's own errors, in one line: its `Display` of a corruption includes a
/// backtrace placeholder that means nothing to an operator.
pub fn describe_sled(e: &sled::Error) -> String {
    match e {
        sled::Error::Corruption { at: Some(at), .. } => {
            format!("sled reports corrupted data (at {at:?})")
        }
        sled::Error::Corruption { at: None, .. } => "sled reports corrupted data".into(),
        sled::Error::Io(e) => format!("I/O error: {e}"),
        other => other.to_string(),
    }
}

/// A key for a message: printable ASCII as text, anything else as hex.
pub fn show_key(k: &[u8]) -> String {
    if k.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
        format!("{:?}", String::from_utf8_lossy(k))
    } else {
        let hex: String = k.iter().map(|b| format!("{b:02x}")).collect();
        format!("0x{hex}")
    }
}

/// Serializes `v` behind its checksum, in one allocation.
pub fn seal<T: Serialize + ?Sized>(v: &T) -> Result<Vec<u8>, bincode::Error> {
    let size = usize::try_from(bincode::serialized_size(v)?).unwrap_or(0);
    let mut buf = Vec::with_capacity(CRC_LEN + size);
    buf.extend_from_slice(&[0; CRC_LEN]);
    bincode::serialize_into(&mut buf, v)?;
    let crc = crc32fast::hash(&buf[CRC_LEN..]);
    buf[..CRC_LEN].copy_from_slice(&crc.to_le_bytes());
    Ok(buf)
}

/// `payload` (already serialized) behind its checksum: what [`seal`] gives
/// for the value it encodes.
pub fn seal_bytes(payload: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(CRC_LEN + payload.len());
    buf.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    buf.extend_from_slice(payload);
    buf
}

/// The payload of a sealed value, once its checksum is verified.
pub fn verify(bytes: &[u8]) -> Result<&[u8], BadValue> {
    let (crc, payload) = match bytes.split_first_chunk::<CRC_LEN>() {
        Some(split) => split,
        None => return Err(BadValue::TooShort(bytes.len())),
    };
    if u32::from_le_bytes(*crc) == crc32fast::hash(payload) {
        Ok(payload)
    } else {
        Err(BadValue::Checksum)
    }
}

/// Verifies and decodes a sealed value.
pub fn unseal<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, BadValue> {
    bincode::deserialize(verify(bytes)?).map_err(BadValue::Decode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_single_bit_flip_is_caught() {
        let sealed = seal(&("service", 8080u16, Some(7u64))).unwrap();
        let back: (String, u16, Option<u64>) = unseal(&sealed).unwrap();
        assert_eq!(back, ("service".to_string(), 8080, Some(7)));
        for byte in 0..sealed.len() {
            for bit in 0..8 {
                let mut bad = sealed.clone();
                bad[byte] ^= 1 << bit;
                assert!(
                    matches!(verify(&bad), Err(BadValue::Checksum)),
                    "flip of bit {bit} in byte {byte} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn sealing_serialized_bytes_is_sealing_the_value() {
        let v = ("service", 8080u16, Some(7u64));
        assert_eq!(
            seal_bytes(&bincode::serialize(&v).unwrap()),
            seal(&v).unwrap()
        );
    }

    #[test]
    fn short_and_empty_values_are_errors_not_panics() {
        assert!(matches!(verify(&[]), Err(BadValue::TooShort(0))));
        assert!(matches!(verify(&[1, 2, 3]), Err(BadValue::TooShort(3))));
        // A valid checksum over a payload that is not a u64.
        let sealed = seal(&1u8).unwrap();
        assert!(matches!(unseal::<u64>(&sealed), Err(BadValue::Decode(_))));
    }
}
