//! NPZ files (what `numpy.savez` writes and `numpy.load` reads) of float32
//! arrays: a zip archive, entries stored uncompressed, one `NAME.npy`
//! (format 1.0, little-endian `<f4`, C order) per array.
//!
//! Only what the loop needs is read back: stored (method 0) members holding
//! `<f4` C-order arrays. Anything else is refused with the member named.

use std::collections::BTreeMap;

use thiserror::Error;

/// The largest archive read or written (the whole file is held in memory).
pub const MAX_BYTES: usize = 1 << 31;

/// An n-dimensional float32 array in C order.
#[derive(Debug, Clone, PartialEq)]
pub struct Array {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// `shape.iter().product()` values.
    pub data: Vec<f32>,
}

impl Array {
    /// An array; `None` when the data does not fill the shape exactly.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Option<Array> {
        (shape.iter().product::<usize>() == data.len()).then_some(Array { shape, data })
    }
}

/// A file that is not an NPZ of float32 arrays this module can read.
#[derive(Debug, Error, PartialEq)]
pub enum NpzError {
    /// The archive's structure is broken or truncated.
    #[error("not a readable npz: {0}")]
    Format(String),
    /// A member is not what this reader supports.
    #[error("member {name}: {reason}")]
    Member {
        /// The member's file name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Too large to hold in memory here.
    #[error("archive of {0} bytes is over the {MAX_BYTES}-byte limit")]
    TooLarge(usize),
}

const LOCAL: u32 = 0x0403_4b50;
const CENTRAL: u32 = 0x0201_4b50;
const END: u32 = 0x0605_4b50;
/// 1980-01-01, the earliest DOS date (a fixed date keeps files reproducible).
const DOS_DATE: u16 = 0x21;

fn npy_bytes(array: &Array) -> Vec<u8> {
    let shape = match array.shape.as_slice() {
        [one] => format!("({one},)"),
        dims => format!(
            "({})",
            dims.iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    // Magic (6) + version (2) + length (2) + header + '\n', padded to 64.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + 4 * array.data.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for value in &array.data {
        out.extend_from_slice(&value.to_le_bytes());
    }
    out
}

/// Encodes `arrays` (name -> array; `.npy` is appended to each name).
pub fn encode(arrays: &BTreeMap<String, Array>) -> Result<Vec<u8>, NpzError> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, array) in arrays {
        let file_name = format!("{name}.npy");
        let body = npy_bytes(array);
        let crc = crc32fast::hash(&body);
        let size = u32::try_from(body.len()).map_err(|_| NpzError::TooLarge(body.len()))?;
        let offset = u32::try_from(out.len()).map_err(|_| NpzError::TooLarge(out.len()))?;
        let name_len = file_name.len() as u16;
        // Local header.
        put32(&mut out, LOCAL);
        for v in [20u16, 0, 0, 0, DOS_DATE] {
            put16(&mut out, v);
        }
        for v in [crc, size, size] {
            put32(&mut out, v);
        }
        put16(&mut out, name_len);
        put16(&mut out, 0);
        out.extend_from_slice(file_name.as_bytes());
        out.extend_from_slice(&body);
        // Central directory entry.
        put32(&mut central, CENTRAL);
        for v in [20u16, 20, 0, 0, 0, DOS_DATE] {
            put16(&mut central, v);
        }
        for v in [crc, size, size] {
            put32(&mut central, v);
        }
        for v in [name_len, 0, 0, 0, 0] {
            put16(&mut central, v);
        }
        put32(&mut central, 0);
        put32(&mut central, offset);
        central.extend_from_slice(file_name.as_bytes());
        if out.len() > MAX_BYTES {
            return Err(NpzError::TooLarge(out.len()));
        }
    }
    let central_offset = out.len() as u32;
    let count = arrays.len() as u16;
    out.extend_from_slice(&central);
    put32(&mut out, END);
    for v in [0u16, 0, count, count] {
        put16(&mut out, v);
    }
    put32(&mut out, central.len() as u32);
    put32(&mut out, central_offset);
    put16(&mut out, 0);
    Ok(out)
}

fn put16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn get16(bytes: &[u8], at: usize) -> Result<u16, NpzError> {
    bytes
        .get(at..at + 2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .ok_or_else(|| NpzError::Format(format!("truncated at byte {at}")))
}

fn get32(bytes: &[u8], at: usize) -> Result<u32, NpzError> {
    bytes
        .get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| NpzError::Format(format!("truncated at byte {at}")))
}

/// Decodes an archive written by [`encode`] or by `numpy.savez` (names
/// without the `.npy`).
pub fn decode(bytes: &[u8]) -> Result<BTreeMap<String, Array>, NpzError> {
    if bytes.len() > MAX_BYTES {
        return Err(NpzError::TooLarge(bytes.len()));
    }
    // The end record is the last 22 bytes plus a comment of up to 64 KiB.
    let lowest = bytes.len().saturating_sub(22 + usize::from(u16::MAX));
    let end = (lowest..=bytes.len().saturating_sub(22))
        .rev()
        .find(|&at| get32(bytes, at) == Ok(END))
        .ok_or_else(|| NpzError::Format("no end of central directory".into()))?;
    let count = usize::from(get16(bytes, end + 10)?);
    let mut at = get32(bytes, end + 16)? as usize;
    let mut arrays = BTreeMap::new();
    for _ in 0..count {
        if get32(bytes, at)? != CENTRAL {
            return Err(NpzError::Format(format!("no central entry at byte {at}")));
        }
        let method = get16(bytes, at + 10)?;
        let crc = get32(bytes, at + 16)?;
        let size = get32(bytes, at + 20)? as usize;
        let name_len = usize::from(get16(bytes, at + 28)?);
        let extra_len = usize::from(get16(bytes, at + 30)?);
        let comment_len = usize::from(get16(bytes, at + 32)?);
        let local = get32(bytes, at + 42)? as usize;
        let name = bytes
            .get(at + 46..at + 46 + name_len)
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .ok_or_else(|| NpzError::Format("truncated member name".into()))?;
        at += 46 + name_len + extra_len + comment_len;
        let member = |reason: String| NpzError::Member {
            name: name.clone(),
            reason,
        };
        if method != 0 {
            return Err(member(format!(
                "compression method {method}; only stored members are read"
            )));
        }
        if get32(bytes, local)? != LOCAL {
            return Err(member("no local header".into()));
        }
        let start = local
            + 30
            + usize::from(get16(bytes, local + 26)?)
            + usize::from(get16(bytes, local + 28)?);
        let body = bytes
            .get(start..start + size)
            .ok_or_else(|| member("truncated data".into()))?;
        if crc32fast::hash(body) != crc {
            return Err(member("CRC mismatch".into()));
        }
        let array = parse_npy(body).map_err(member)?;
        let key = name.strip_suffix(".npy").unwrap_or(&name).to_string();
        arrays.insert(key, array);
    }
    Ok(arrays)
}

fn parse_npy(body: &[u8]) -> Result<Array, String> {
    if body.get(..6) != Some(b"\x93NUMPY") {
        return Err("not an .npy file".into());
    }
    let (header_len, header_start) = match body.get(6) {
        Some(1) => (usize::from(u16::from_le_bytes([body[8], body[9]])), 10),
        Some(2) | Some(3) => (
            u32::from_le_bytes([body[8], body[9], body[10], body[11]]) as usize,
            12,
        ),
        _ => return Err("unknown .npy version".into()),
    };
    let header = body
        .get(header_start..header_start + header_len)
        .map(String::from_utf8_lossy)
        .ok_or("truncated header")?;
    if !header.contains("'descr': '<f4'") {
        return Err(format!("dtype is not <f4: {}", header.trim()));
    }
    if !header.contains("'fortran_order': False") {
        return Err("Fortran order is not read".into());
    }
    let shape_text = header
        .split("'shape': (")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .ok_or("no shape")?;
    let shape = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| format!("bad dimension {s:?}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let data: Vec<f32> = body[header_start + header_len..]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let want = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or("shape overflows")?;
    if data.len() != want || body.len() - header_start - header_len != 4 * want {
        return Err(format!(
            "{} bytes of data for shape {shape:?}",
            body.len() - header_start - header_len
        ));
    }
    Ok(Array { shape, data })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> BTreeMap<String, Array> {
        let mut arrays = BTreeMap::new();
        let x: Vec<f32> = (0..2 * 2 * 3).map(|i| i as f32 * 0.5).collect();
        arrays.insert("x".into(), Array::new(vec![2, 2, 3], x).expect("shape"));
        arrays.insert(
            "z".into(),
            Array::new(vec![2], vec![1.0, -1.0]).expect("shape"),
        );
        arrays.insert(
            "empty".into(),
            Array::new(vec![0, 7], vec![]).expect("shape"),
        );
        arrays
    }

    #[test]
    fn arrays_round_trip() {
        let bytes = encode(&sample()).expect("encode");
        assert_eq!(decode(&bytes).expect("decode"), sample());
        // Each header is padded so that the data starts 64-byte aligned
        // within its member, as numpy writes it.
        assert_eq!(npy_bytes(&sample()["z"]).len(), 128 + 8);
    }

    #[test]
    fn damage_is_refused_with_the_member_named() {
        let bytes = encode(&sample()).expect("encode");
        let mut flipped = bytes.clone();
        // The last data byte of the first member ("empty.npy" has no data,
        // so flip inside "x.npy": the byte before its central entry's area).
        let x_start = bytes
            .windows(5)
            .position(|w| w == b"x.npy")
            .expect("x member")
            + 5;
        flipped[x_start + 64 + 3] ^= 0xff;
        assert_eq!(
            decode(&flipped),
            Err(NpzError::Member {
                name: "x.npy".into(),
                reason: "CRC mismatch".into()
            })
        );
        assert!(matches!(
            decode(&bytes[..bytes.len() - 30]),
            Err(NpzError::Format(_))
        ));
        assert!(matches!(
            decode(b"not a zip at all"),
            Err(NpzError::Format(_))
        ));
        assert!(Array::new(vec![2, 2], vec![0.0; 3]).is_none());
    }
}
