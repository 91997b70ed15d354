//! The JSON metadata: checked as cryptsetup's `LUKS2_hdr_validate` checks it
//! (`lib/luks2/luks2_json_metadata.c`), then read into typed values.
//!
//! Two levels. [`validate`] is the structural check a copy must pass to be usable at all (the
//! one cryptsetup applies to each copy before comparing sequence ids). [`Meta::parse`] then
//! refuses what this implementation does not support (requirements, integrity, several
//! segments or digests, unknown keyslot, KDF or digest types) and produces typed keyslots, the
//! digest and the segment. The parsed `serde_json::Value` tree is kept as it is: a rewrite
//! changes only the keyslot, digest and token entries it means to change (serde_json's
//! `preserve_order` keeps every object's key order, so tokens and unknown fields are written
//! back byte for byte).

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::base64;
use super::binhdr::{BIN_LEN, HDR_SIZES};
use super::{Luks2Error, Result};
use crate::crypto::luks::pbkdf::LuksHash;
use crate::crypto::sector::CipherSpec;

/// Most keyslots, tokens, segments (cryptsetup's LUKS2_OBJECTS_MAX).
pub const OBJECTS_MAX: u32 = 32;
/// Largest keyslots area (cryptsetup's LUKS2_MAX_KEYSLOTS_SIZE, 128 MiB).
pub const MAX_KEYSLOTS_SIZE: u64 = 0x800_0000;
/// Anti-forensic stripes: cryptsetup always uses 4000, whatever the JSON says.
pub const STRIPES: u32 = 4000;
/// Salt length of keyslots and digests.
pub const SALT_LEN: usize = 32;

fn meta(reason: impl Into<String>) -> Luks2Error {
    Luks2Error::Meta(reason.into())
}

fn unsupported(reason: impl Into<String>) -> Luks2Error {
    Luks2Error::Unsupported(reason.into())
}

fn obj<'a>(v: &'a Value, key: &str, ctx: &str) -> Result<&'a Map<String, Value>> {
    v.get(key)
        .and_then(Value::as_object)
        .ok_or_else(|| meta(format!("{ctx}: \"{key}\" missing or not an object")))
}

fn string<'a>(v: &'a Value, key: &str, ctx: &str) -> Result<&'a str> {
    match v.get(key).and_then(Value::as_str) {
        Some(s) if !s.is_empty() => Ok(s),
        _ => Err(meta(format!("{ctx}: \"{key}\" missing or not a string"))),
    }
}

fn int(v: &Value, key: &str, ctx: &str) -> Result<u64> {
    v.get(key).and_then(Value::as_u64).ok_or_else(|| {
        meta(format!(
            "{ctx}: \"{key}\" missing or not a non-negative integer"
        ))
    })
}

fn uint32(v: &Value, key: &str, ctx: &str) -> Result<u32> {
    u32::try_from(int(v, key, ctx)?).map_err(|_| meta(format!("{ctx}: \"{key}\" exceeds 32 bits")))
}

/// A u64 written as a decimal string ("offset": "16777216"), as the format stores them.
fn num_string(v: &Value, key: &str, ctx: &str) -> Result<u64> {
    let s = string(v, key, ctx)?;
    if !s.bytes().all(|c| c.is_ascii_digit()) {
        return Err(meta(format!("{ctx}: \"{key}\" is not a decimal number")));
    }
    s.parse()
        .map_err(|_| meta(format!("{ctx}: \"{key}\" does not fit 64 bits")))
}

fn numbered(key: &str, ctx: &str) -> Result<u32> {
    let n: u32 = if key.bytes().all(|c| c.is_ascii_digit()) {
        key.parse().ok()
    } else {
        None
    }
    .ok_or_else(|| meta(format!("{ctx} \"{key}\" is not a number")))?;
    if n >= OBJECTS_MAX {
        return Err(meta(format!(
            "{ctx} {n} is out of range (0..{OBJECTS_MAX})"
        )));
    }
    Ok(n)
}

fn string_array<'a>(v: &'a Value, key: &str, ctx: &str) -> Result<Vec<&'a str>> {
    let a = v
        .get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| meta(format!("{ctx}: \"{key}\" missing or not an array")))?;
    a.iter()
        .map(|e| {
            e.as_str()
                .ok_or_else(|| meta(format!("{ctx}: \"{key}\" holds a non-string")))
        })
        .collect()
}

fn optional_string_array<'a>(v: &'a Value, key: &str, ctx: &str) -> Result<Vec<&'a str>> {
    if v.get(key).is_none() {
        return Ok(Vec::new());
    }
    string_array(v, key, ctx)
}

/// Sizes from the config section.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// JSON area size (hdr_size − 4096).
    pub json_size: u64,
    /// Size of the keyslots area, which starts at 2 × hdr_size.
    pub keyslots_size: u64,
}

impl Config {
    /// hdr_size: binary header plus JSON area.
    pub fn hdr_size(&self) -> u64 {
        self.json_size + BIN_LEN as u64
    }

    /// Where the keyslots area starts.
    pub fn keyslots_start(&self) -> u64 {
        2 * self.hdr_size()
    }

    /// Where the keyslots area ends (= header + areas size).
    pub fn keyslots_end(&self) -> u64 {
        self.keyslots_start() + self.keyslots_size
    }
}

/// The structural check of one copy's JSON (cryptsetup's `LUKS2_hdr_validate`), for a copy of
/// `hdr_size` bytes. Returns the config sizes.
pub fn validate(root: &Value, hdr_size: u64) -> Result<Config> {
    let ctx = "JSON";
    let keyslots = obj(root, "keyslots", ctx)?;
    let tokens = obj(root, "tokens", ctx)?;
    let segments = obj(root, "segments", ctx)?;
    let digests = obj(root, "digests", ctx)?;
    let config_v = root
        .get("config")
        .filter(|c| c.is_object())
        .ok_or_else(|| meta("JSON: \"config\" missing or not an object"))?;
    let json_size = num_string(config_v, "json_size", "config")?;
    let keyslots_size = num_string(config_v, "keyslots_size", "config")?;
    let config = Config {
        json_size,
        keyslots_size,
    };
    if json_size.checked_add(BIN_LEN as u64) != Some(hdr_size) {
        return Err(meta(format!(
            "config json_size {json_size} does not match the header size {hdr_size}"
        )));
    }
    if !HDR_SIZES.contains(&hdr_size) {
        return Err(meta(format!(
            "header size {hdr_size} is not one the format allows"
        )));
    }
    if !keyslots_size.is_multiple_of(4096) || keyslots_size > MAX_KEYSLOTS_SIZE {
        return Err(meta(format!("keyslots_size {keyslots_size} is not valid")));
    }
    optional_string_array(config_v, "flags", "config")?;
    if let Some(req) = config_v.get("requirements") {
        if !req.is_object() {
            return Err(meta("config: \"requirements\" is not an object"));
        }
        optional_string_array(req, "mandatory", "config requirements")?;
    }

    for (k, ks) in keyslots {
        let id = numbered(k, "keyslot")?;
        let c = format!("keyslot {id}");
        string(ks, "type", &c)?;
        uint32(ks, "key_size", &c)?;
        if ks.get("type").and_then(Value::as_str) == Some("luks2") {
            validate_luks2_keyslot(ks, &c)?;
        }
    }
    for (k, t) in tokens {
        let id = numbered(k, "token")?;
        let c = format!("token {id}");
        string(t, "type", &c)?;
        for s in string_array(t, "keyslots", &c)? {
            if !keyslots.contains_key(s) {
                return Err(meta(format!("{c} names missing keyslot {s}")));
            }
        }
    }
    for (k, d) in digests {
        let id = numbered(k, "digest")?;
        let c = format!("digest {id}");
        string(d, "type", &c)?;
        for s in string_array(d, "keyslots", &c)? {
            if !keyslots.contains_key(s) {
                return Err(meta(format!("{c} names missing keyslot {s}")));
            }
        }
        for s in string_array(d, "segments", &c)? {
            if !segments.contains_key(s) {
                return Err(meta(format!("{c} names missing segment {s}")));
            }
        }
    }
    if segments.is_empty() {
        return Err(meta("no segments"));
    }
    let mut min_offset = u64::MAX;
    for (k, s) in segments {
        let id = numbered(k, "segment")?;
        let c = format!("segment {id}");
        let ty = string(s, "type", &c)?;
        let offset = num_string(s, "offset", &c)?;
        let size = match string(s, "size", &c)? {
            "dynamic" => 0,
            _ => {
                let n = num_string(s, "size", &c)?;
                if n == 0 {
                    return Err(meta(format!("{c}: size is zero")));
                }
                n
            }
        };
        if !offset.is_multiple_of(512) || !size.is_multiple_of(512) {
            return Err(meta(format!("{c}: offset or size not a multiple of 512")));
        }
        optional_string_array(s, "flags", &c)?;
        if ty == "crypt" {
            num_string(s, "iv_tweak", &c)?;
            string(s, "encryption", &c)?;
            let ss = uint32(s, "sector_size", &c)?;
            if ss == 0 || !ss.is_multiple_of(512) || !size.is_multiple_of(u64::from(ss)) {
                return Err(meta(format!("{c}: bad sector_size {ss}")));
            }
            if let Some(i) = s.get("integrity") {
                if !i.is_object() {
                    return Err(meta(format!("{c}: integrity is not an object")));
                }
            }
            let has_digest = digests.values().any(|d| {
                d.get("segments")
                    .and_then(Value::as_array)
                    .is_some_and(|a| a.iter().any(|x| x.as_str() == Some(k.as_str())))
            });
            if !has_digest {
                return Err(meta(format!("{c} has no digest")));
            }
        }
        min_offset = min_offset.min(offset);
    }
    let md = hdr_size;
    if min_offset != 0 && (min_offset < keyslots_size || min_offset - keyslots_size < 2 * md) {
        return Err(meta(format!(
            "keyslots area ({keyslots_size} bytes after {}) overlaps the data at {min_offset}",
            2 * md
        )));
    }
    // Keyslot areas: inside the keyslots area, non-empty, not overlapping each other.
    let mut areas: Vec<(u32, u64, u64)> = Vec::new();
    for (k, ks) in keyslots {
        let id = numbered(k, "keyslot")?;
        let c = format!("keyslot {id} area");
        let area = ks
            .get("area")
            .filter(|a| a.is_object())
            .ok_or_else(|| meta(format!("{c} missing")))?;
        string(area, "type", &c)?;
        let off = num_string(area, "offset", &c)?;
        let len = num_string(area, "size", &c)?;
        let end = off
            .checked_add(len)
            .ok_or_else(|| meta(format!("{c} overflows")))?;
        if off < 2 * md || len == 0 || end > config.keyslots_end() {
            return Err(meta(format!(
                "{c} {off}+{len} lies outside the keyslots area {}..{}",
                2 * md,
                config.keyslots_end()
            )));
        }
        if min_offset != 0 && end > min_offset {
            return Err(meta(format!("{c} {off}+{len} overlaps the data segment")));
        }
        for &(j, o2, e2) in &areas {
            if off < e2 && o2 < end {
                return Err(meta(format!("keyslot {id} area overlaps keyslot {j} area")));
            }
        }
        areas.push((id, off, end));
    }
    Ok(config)
}

fn validate_luks2_keyslot(ks: &Value, c: &str) -> Result<()> {
    let kdf = ks
        .get("kdf")
        .filter(|k| k.is_object())
        .ok_or_else(|| meta(format!("{c}: kdf missing")))?;
    let af = ks
        .get("af")
        .filter(|k| k.is_object())
        .ok_or_else(|| meta(format!("{c}: af missing")))?;
    let area = ks
        .get("area")
        .filter(|k| k.is_object())
        .ok_or_else(|| meta(format!("{c}: area missing")))?;
    let count = kdf.as_object().map_or(0, Map::len);
    match string(kdf, "type", c)? {
        "pbkdf2" => {
            if count != 4 {
                return Err(meta(format!("{c}: pbkdf2 kdf must have exactly 4 fields")));
            }
            string(kdf, "hash", c)?;
            int(kdf, "iterations", c)?;
            string(kdf, "salt", c)?;
        }
        "argon2i" | "argon2id" => {
            if count != 5 {
                return Err(meta(format!("{c}: argon2 kdf must have exactly 5 fields")));
            }
            int(kdf, "time", c)?;
            int(kdf, "memory", c)?;
            int(kdf, "cpus", c)?;
            string(kdf, "salt", c)?;
        }
        _ => {}
    }
    if string(af, "type", c)? != "luks1" {
        return Err(meta(format!("{c}: af type is not luks1")));
    }
    string(af, "hash", c)?;
    int(af, "stripes", c)?;
    if string(area, "type", c)? != "raw" {
        return Err(meta(format!("{c}: area type is not raw")));
    }
    string(area, "encryption", c)?;
    int(area, "key_size", c)?;
    Ok(())
}

/// Key derivation of a keyslot.
#[derive(Clone, PartialEq, Eq)]
pub enum Kdf {
    Pbkdf2 {
        hash: LuksHash,
        iterations: u32,
        salt: [u8; SALT_LEN],
    },
    Argon2 {
        id: bool,
        time: u32,
        memory_kib: u32,
        cpus: u32,
        salt: [u8; SALT_LEN],
    },
}

impl std::fmt::Debug for Kdf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Kdf::Pbkdf2 {
                hash, iterations, ..
            } => write!(f, "pbkdf2({}, {iterations})", hash.name()),
            Kdf::Argon2 {
                id,
                time,
                memory_kib,
                cpus,
                ..
            } => write!(
                f,
                "{}(t={time}, m={memory_kib} KiB, p={cpus})",
                if *id { "argon2id" } else { "argon2i" }
            ),
        }
    }
}

impl Kdf {
    /// The type name in the JSON.
    pub fn type_name(&self) -> &'static str {
        match self {
            Kdf::Pbkdf2 { .. } => "pbkdf2",
            Kdf::Argon2 { id: true, .. } => "argon2id",
            Kdf::Argon2 { id: false, .. } => "argon2i",
        }
    }

    /// The JSON object cryptsetup writes for this KDF (same key order).
    pub fn to_json(&self) -> Value {
        match self {
            Kdf::Pbkdf2 {
                hash,
                iterations,
                salt,
            } => serde_json::json!({
                "type": "pbkdf2",
                "hash": hash.name(),
                "iterations": iterations,
                "salt": base64::encode(salt),
            }),
            Kdf::Argon2 {
                time,
                memory_kib,
                cpus,
                salt,
                ..
            } => serde_json::json!({
                "type": self.type_name(),
                "time": time,
                "memory": memory_kib,
                "cpus": cpus,
                "salt": base64::encode(salt),
            }),
        }
    }
}

fn salt32(v: &Value, key: &str, ctx: &str) -> Result<[u8; SALT_LEN]> {
    let b = base64::decode(string(v, key, ctx)?)
        .ok_or_else(|| meta(format!("{ctx}: \"{key}\" is not base64")))?;
    <[u8; SALT_LEN]>::try_from(b.as_slice())
        .map_err(|_| meta(format!("{ctx}: \"{key}\" is not {SALT_LEN} bytes")))
}

fn hash_named(name: &str, ctx: &str) -> Result<LuksHash> {
    LuksHash::from_name(name)
        .ok_or_else(|| unsupported(format!("{ctx}: hash {name:?} (sha1, sha256, sha512)")))
}

/// `aes-xts-plain64` with a key of `key_len` bytes as a cipher spec.
pub fn parse_encryption(s: &str, key_len: usize, ctx: &str) -> Result<CipherSpec> {
    let (name, mode) = s
        .split_once('-')
        .ok_or_else(|| unsupported(format!("{ctx}: cipher {s:?}")))?;
    CipherSpec::from_luks(name, mode, key_len).map_err(|e| {
        unsupported(format!(
            "{ctx}: cipher {s:?} with a {key_len}-byte key: {e}"
        ))
    })
}

/// A luks2 keyslot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keyslot {
    pub id: u32,
    /// Volume key length.
    pub key_size: usize,
    pub kdf: Kdf,
    pub af_hash: LuksHash,
    pub area_offset: u64,
    pub area_size: u64,
    /// Key-material encryption (keyed with the KDF output of `area_key_size` bytes).
    pub area_spec: CipherSpec,
    pub area_key_size: usize,
    pub area_encryption: String,
}

impl Keyslot {
    /// Bytes of split key material: key_size × 4000 rounded up to 512.
    pub fn material_len(&self) -> Result<usize> {
        let n = self
            .key_size
            .checked_mul(STRIPES as usize)
            .ok_or(Luks2Error::Overflow)?;
        Ok(n.div_ceil(512) * 512)
    }
}

/// The pbkdf2 digest of the volume key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VkDigest {
    pub id: u32,
    pub hash: LuksHash,
    pub iterations: u32,
    pub salt: [u8; SALT_LEN],
    pub digest: Vec<u8>,
    pub keyslots: Vec<u32>,
}

/// The one crypt segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Data offset in bytes.
    pub offset: u64,
    /// Data size in bytes, None for "dynamic" (to the end of the file).
    pub size: Option<u64>,
    /// Added to every IV sector number (512-byte units).
    pub iv_tweak: u64,
    pub encryption: String,
    pub spec: CipherSpec,
    /// Encryption sector size: 512, 1024, 2048 or 4096.
    pub sector_size: u32,
}

/// Typed metadata of a supported LUKS2 header, with the JSON tree it came from.
#[derive(Clone, Debug)]
pub struct Meta {
    pub root: Value,
    pub config: Config,
    pub keyslots: BTreeMap<u32, Keyslot>,
    pub digest: VkDigest,
    pub segment: Segment,
    /// Volume key length in bytes.
    pub key_size: usize,
    /// Token ids (kept, not interpreted).
    pub tokens: Vec<u32>,
    /// config.flags (activation flags: kept, shown, not interpreted).
    pub flags: Vec<String>,
}

impl Meta {
    /// Validates `root` for a header of `hdr_size` bytes and refuses what is not supported.
    pub fn parse(root: Value, hdr_size: u64) -> Result<Self> {
        let config = validate(&root, hdr_size)?;
        let cfg = &root["config"];
        if let Some(req) = cfg.get("requirements") {
            let m = optional_string_array(req, "mandatory", "requirements")?;
            if !m.is_empty() {
                return Err(unsupported(format!(
                    "requirements {m:?} (e.g. reencryption in progress) are not implemented"
                )));
            }
        }
        let flags = optional_string_array(cfg, "flags", "config")?
            .into_iter()
            .map(str::to_owned)
            .collect();
        let segments = obj(&root, "segments", "JSON")?;
        if segments.len() != 1 {
            return Err(unsupported(format!(
                "{} segments (only one crypt segment is supported)",
                segments.len()
            )));
        }
        let digests = obj(&root, "digests", "JSON")?;
        if digests.len() != 1 {
            return Err(unsupported(format!(
                "{} digests (exactly one is supported)",
                digests.len()
            )));
        }
        let (dk, d) = digests.iter().next().ok_or_else(|| meta("no digest"))?;
        let dc = format!("digest {dk}");
        if string(d, "type", &dc)? != "pbkdf2" {
            return Err(unsupported(format!(
                "{dc} type {:?} (only pbkdf2)",
                string(d, "type", &dc)?
            )));
        }
        let digest_bytes = base64::decode(string(d, "digest", &dc)?)
            .ok_or_else(|| meta(format!("{dc}: digest is not base64")))?;
        let dhash = hash_named(string(d, "hash", &dc)?, &dc)?;
        if digest_bytes.len() != 20 && digest_bytes.len() != dhash.digest_len() {
            return Err(meta(format!("{dc}: digest length {}", digest_bytes.len())));
        }
        let digest = VkDigest {
            id: numbered(dk, "digest")?,
            hash: dhash,
            iterations: {
                let it = uint32(d, "iterations", &dc)?;
                if it == 0 {
                    return Err(meta(format!("{dc}: zero iterations")));
                }
                it
            },
            salt: salt32(d, "salt", &dc)?,
            digest: digest_bytes,
            keyslots: string_array(d, "keyslots", &dc)?
                .into_iter()
                .map(|s| numbered(s, "keyslot"))
                .collect::<Result<_>>()?,
        };

        let (sk, s) = segments.iter().next().ok_or_else(|| meta("no segment"))?;
        let sc = format!("segment {sk}");
        let ty = string(s, "type", &sc)?;
        if ty != "crypt" {
            return Err(unsupported(format!("{sc} type {ty:?} (only crypt)")));
        }
        if s.get("integrity").is_some() {
            return Err(unsupported(format!(
                "{sc} has integrity protection (dm-integrity), which is not implemented"
            )));
        }
        let sflags = optional_string_array(s, "flags", &sc)?;
        if !sflags.is_empty() {
            return Err(unsupported(format!("{sc} flags {sflags:?}")));
        }
        if !string_array(d, "segments", &dc)?.contains(&sk.as_str()) {
            return Err(meta(format!("{sc} is not covered by the digest")));
        }
        let sector_size = uint32(s, "sector_size", &sc)?;
        if !matches!(sector_size, 512 | 1024 | 2048 | 4096) {
            return Err(unsupported(format!(
                "{sc} sector size {sector_size} (512 to 4096)"
            )));
        }
        let keyslots_json = obj(&root, "keyslots", "JSON")?;
        let mut keyslots = BTreeMap::new();
        for (k, ks) in keyslots_json {
            let id = numbered(k, "keyslot")?;
            let c = format!("keyslot {id}");
            let ty = string(ks, "type", &c)?;
            if ty != "luks2" {
                return Err(unsupported(format!("{c} type {ty:?} (only luks2)")));
            }
            keyslots.insert(id, parse_keyslot(id, ks, &c)?);
        }
        let key_size = match keyslots.values().next() {
            Some(k) => k.key_size,
            None => return Err(unsupported("no keyslots: nothing can unlock the volume")),
        };
        if let Some(k) = keyslots.values().find(|k| k.key_size != key_size) {
            return Err(unsupported(format!(
                "keyslot {} stores a {}-byte key, others {key_size}",
                k.id, k.key_size
            )));
        }
        let encryption = string(s, "encryption", &sc)?.to_owned();
        let spec = parse_encryption(&encryption, key_size, &sc)?;
        let size = match string(s, "size", &sc)? {
            "dynamic" => None,
            _ => Some(num_string(s, "size", &sc)?),
        };
        let segment = Segment {
            offset: num_string(s, "offset", &sc)?,
            size,
            iv_tweak: num_string(s, "iv_tweak", &sc)?,
            encryption,
            spec,
            sector_size,
        };
        if segment.offset == 0 {
            return Err(unsupported("detached header (data offset 0)"));
        }
        let tokens = obj(&root, "tokens", "JSON")?
            .keys()
            .map(|k| numbered(k, "token"))
            .collect::<Result<_>>()?;
        Ok(Self {
            root,
            config,
            keyslots,
            digest,
            segment,
            key_size,
            tokens,
            flags,
        })
    }

    /// The first unused keyslot id.
    pub fn free_keyslot(&self) -> Option<u32> {
        (0..OBJECTS_MAX).find(|i| !self.keyslots.contains_key(i))
    }

    /// A free, 4096-aligned gap of `len` bytes in the keyslots area (cryptsetup's
    /// `LUKS2_find_area_gap`: the first one from the start).
    pub fn find_area_gap(&self, len: u64) -> Option<u64> {
        let mut used: Vec<(u64, u64)> = self
            .keyslots
            .values()
            .map(|k| (k.area_offset, k.area_offset + k.area_size))
            .collect();
        used.sort_unstable();
        let mut offset = self.config.keyslots_start();
        for (start, end) in used {
            if offset + len <= start {
                break;
            }
            offset = offset.max(end);
        }
        (offset + len <= self.config.keyslots_end()).then_some(offset)
    }
}

fn parse_keyslot(id: u32, ks: &Value, c: &str) -> Result<Keyslot> {
    let kdf_v = &ks["kdf"];
    let kdf = match string(kdf_v, "type", c)? {
        "pbkdf2" => Kdf::Pbkdf2 {
            hash: hash_named(string(kdf_v, "hash", c)?, c)?,
            iterations: uint32(kdf_v, "iterations", c)?,
            salt: salt32(kdf_v, "salt", c)?,
        },
        t @ ("argon2i" | "argon2id") => Kdf::Argon2 {
            id: t == "argon2id",
            time: uint32(kdf_v, "time", c)?,
            memory_kib: uint32(kdf_v, "memory", c)?,
            cpus: uint32(kdf_v, "cpus", c)?,
            salt: salt32(kdf_v, "salt", c)?,
        },
        t => return Err(unsupported(format!("{c}: KDF type {t:?}"))),
    };
    let af = &ks["af"];
    let stripes = uint32(af, "stripes", c)?;
    if stripes != STRIPES {
        return Err(unsupported(format!(
            "{c}: {stripes} AF stripes (only 4000)"
        )));
    }
    let key_size = usize::try_from(uint32(ks, "key_size", c)?).map_err(|_| Luks2Error::Overflow)?;
    if !(16..=64).contains(&key_size) {
        return Err(unsupported(format!("{c}: key size {key_size} bytes")));
    }
    let area = &ks["area"];
    let area_key_size =
        usize::try_from(uint32(area, "key_size", c)?).map_err(|_| Luks2Error::Overflow)?;
    let area_encryption = string(area, "encryption", c)?.to_owned();
    let area_spec = parse_encryption(&area_encryption, area_key_size, c)?;
    let k = Keyslot {
        id,
        key_size,
        kdf,
        af_hash: hash_named(string(af, "hash", c)?, c)?,
        area_offset: num_string(area, "offset", c)?,
        area_size: num_string(area, "size", c)?,
        area_spec,
        area_key_size,
        area_encryption,
    };
    let need = u64::try_from(k.material_len()?).map_err(|_| Luks2Error::Overflow)?;
    if k.area_size < need {
        return Err(meta(format!(
            "{c}: area of {} bytes is smaller than the {need} bytes of key material",
            k.area_size
        )));
    }
    Ok(k)
}
