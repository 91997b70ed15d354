//! What `keyslot list` and `info` show of a LUKS2 header: the binary header, the data
//! segment, keyslots (KDF and area), tokens, digests and which header copy is in use.

use serde_json::{json, Value};

use super::keyslot::OutputFormat;
use crate::crypto::luks::luks2::meta::Kdf;
use crate::crypto::luks::luks2::volume::CopyUsed;
use crate::crypto::luks::luks2::Luks2Header;

/// The metadata as JSON (field names in the style of `qemu-img info`).
pub fn to_json(h: &Luks2Header) -> Value {
    let m = &h.meta;
    let seg = &m.segment;
    let keyslots: Vec<Value> = m
        .keyslots
        .values()
        .map(|k| {
            let mut v = json!({
                "slot": k.id,
                "type": "luks2",
                "key-bits": k.key_size * 8,
                "kdf": k.kdf.type_name(),
                "af-hash": k.af_hash.name(),
                "area-encryption": k.area_encryption,
                "area-offset": k.area_offset,
                "area-size": k.area_size,
                "bound-to-data": m.digest.keyslots.contains(&k.id),
            });
            if let Some(o) = v.as_object_mut() {
                match &k.kdf {
                    Kdf::Pbkdf2 {
                        hash, iterations, ..
                    } => {
                        o.insert("hash".into(), json!(hash.name()));
                        o.insert("iterations".into(), json!(iterations));
                    }
                    Kdf::Argon2 {
                        time,
                        memory_kib,
                        cpus,
                        ..
                    } => {
                        o.insert("time-cost".into(), json!(time));
                        o.insert("memory-kib".into(), json!(memory_kib));
                        o.insert("threads".into(), json!(cpus));
                    }
                }
                if let Some(p) = m.root["keyslots"][k.id.to_string()].get("priority") {
                    o.insert("priority".into(), p.clone());
                }
            }
            v
        })
        .collect();
    let tokens: Vec<Value> = m
        .tokens
        .iter()
        .map(|t| {
            let tok = &m.root["tokens"][t.to_string()];
            json!({"token": t, "type": tok["type"], "keyslots": tok["keyslots"]})
        })
        .collect();
    json!({
        "format": "luks2",
        "uuid": h.uuid(),
        "label": h.label(),
        "subsystem": h.subsystem(),
        "seqid": h.bin.seqid,
        "header-copy": match h.used { CopyUsed::Primary => "primary", CopyUsed::Secondary => "secondary" },
        "other-copy-problem": h.other_problem,
        "metadata-size": h.bin.hdr_size,
        "keyslots-size": m.config.keyslots_size,
        "flags": m.flags,
        "cipher": seg.encryption,
        "key-bits": m.key_size * 8,
        "sector-size": seg.sector_size,
        "data-offset": seg.offset,
        "data-size": seg.size.map_or(json!("dynamic"), |s| json!(s)),
        "iv-tweak": seg.iv_tweak,
        "digest": {"type": "pbkdf2", "hash": m.digest.hash.name(), "iterations": m.digest.iterations},
        "keyslots": keyslots,
        "tokens": tokens,
    })
}

/// A human or JSON description of a LUKS2 header.
pub fn describe(h: &Luks2Header, format: OutputFormat) -> String {
    let v = to_json(h);
    if format == OutputFormat::Json {
        return serde_json::to_string_pretty(&v).unwrap_or_default() + "\n";
    }
    let m = &h.meta;
    let seg = &m.segment;
    let mut s = format!(
        "format: LUKS2\nuuid: {}\nlabel: {}\nsequence id: {} ({} header copy in use{})\n\
         metadata size: {}\nkeyslots size: {}\ncipher: {} ({} bits), {}-byte sectors\n\
         data offset: {}\ndata size: {}\niv tweak: {}\n",
        h.uuid(),
        h.label(),
        h.bin.seqid,
        if h.used == CopyUsed::Primary {
            "primary"
        } else {
            "secondary"
        },
        h.other_problem
            .as_ref()
            .map_or(String::new(), |p| format!("; other copy: {p}")),
        h.bin.hdr_size,
        m.config.keyslots_size,
        seg.encryption,
        m.key_size * 8,
        seg.sector_size,
        seg.offset,
        seg.size.map_or("dynamic".to_string(), |n| n.to_string()),
        seg.iv_tweak,
    );
    for k in m.keyslots.values() {
        s += &format!(
            "keyslot {}: {:?}, AF {}, area {}+{} ({})\n",
            k.id,
            k.kdf,
            k.af_hash.name(),
            k.area_offset,
            k.area_size,
            k.area_encryption
        );
    }
    for t in &m.tokens {
        s += &format!(
            "token {t}: {}\n",
            m.root["tokens"][t.to_string()]["type"]
                .as_str()
                .unwrap_or("?")
        );
    }
    s
}
