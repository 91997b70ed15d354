//! `create -o key=value,…` as qemu-img spells it, and `--object secret,id=ID,file=F`, folded into
//! the long options of [`CreateArgs`] before the image is made.
//!
//! Accepted keys (qcow2): `size`, `backing_file`, `backing_fmt`, `cluster_size`, `compat`
//! (`0.10`/`v2`, `1.1`/`v3`), `lazy_refcounts`, `refcount_bits`, `extended_l2`,
//! `compression_type` (`zlib`, `zstd`), `preallocation` (`off`, `metadata`, `falloc`, `full`),
//! `encrypt.format` (`luks`), `encrypt.cipher-alg`, `encrypt.cipher-mode`, `encrypt.ivgen-alg`,
//! `encrypt.ivgen-hash-alg`, `encrypt.hash-alg`, `encrypt.iter-time`, `encrypt.key-secret`.
//! Raw: `size`, `preallocation` (`off`, `falloc`, `full`; `metadata` is refused, as qemu-img
//! refuses it). For `-f luks` (qemu-img's raw LUKS format) the same keys without the `encrypt.`
//! prefix. Unknown keys are refused ("Invalid parameter"), as qemu-img refuses them.
//! `falloc` is served as `full` (the clusters read as zeroes either way).
//! A comma inside a value is written `,,` as in QEMU's option syntax.

use std::path::PathBuf;

use super::create::{CreateArgs, CreateFormat, PreallocArg};
use super::encrypt::EncryptFormat;
use super::tools::ToolError;

/// Splits `a=1,b=2` into pairs; `,,` is a literal comma.
pub fn split_options(s: &str) -> Result<Vec<(String, String)>, ToolError> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    let mut items = Vec::new();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                items.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    items.push(cur);
    for item in items.into_iter().filter(|i| !i.is_empty()) {
        let (k, v) = item
            .split_once('=')
            .ok_or(ToolError::BadArgument("options are key=value"))?;
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

fn bool_opt(v: &str) -> Result<bool, ToolError> {
    match v {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(ToolError::BadArgument(
            "a boolean option is on/off (yes/no, true/false)",
        )),
    }
}

/// A secret object given as `--object secret,id=ID,file=F` (only `file=`: a passphrase never
/// goes on the command line).
pub fn parse_secret_object(s: &str) -> Result<(String, PathBuf), ToolError> {
    let kv = split_options(s.strip_prefix("secret,").ok_or(ToolError::BadArgument(
        "only --object secret,id=ID,file=FILE is supported",
    ))?)?;
    let mut id = None;
    let mut file = None;
    for (k, v) in kv {
        match k.as_str() {
            "id" => id = Some(v),
            "file" => file = Some(PathBuf::from(v)),
            "format" if v == "raw" => {}
            "data" => {
                return Err(ToolError::BadArgument(
                    "secret data= on the command line is refused: use file=",
                ))
            }
            _ => return Err(ToolError::BadArgument("unsupported secret object property")),
        }
    }
    match (id, file) {
        (Some(id), Some(file)) => Ok((id, file)),
        _ => Err(ToolError::BadArgument(
            "a secret object needs id= and file=",
        )),
    }
}

/// Folds `args.options` (and the secret objects) into the long options.
pub fn apply(args: &CreateArgs) -> Result<CreateArgs, ToolError> {
    let mut a = args.clone();
    let secrets = args
        .objects
        .iter()
        .map(|o| parse_secret_object(o))
        .collect::<Result<Vec<_>, _>>()?;
    let mut cipher_alg = None;
    let mut cipher_mode = None;
    let mut ivgen_alg = None;
    let mut ivgen_hash = None;
    for opts in &args.options {
        for (k, v) in split_options(opts)? {
            let luks_key = if a.format == CreateFormat::Luks {
                Some(k.as_str())
            } else {
                k.strip_prefix("encrypt.")
            };
            match (k.as_str(), luks_key) {
                ("size", _) => a.size = Some(v),
                (_, Some("format")) => match v.as_str() {
                    "luks" => a.encrypt.encrypt = Some(EncryptFormat::Luks),
                    _ => {
                        return Err(ToolError::BadArgument(
                            "encrypt.format must be luks (legacy aes images are never created)",
                        ))
                    }
                },
                (_, Some("cipher-alg")) => cipher_alg = Some(v),
                (_, Some("cipher-mode")) => cipher_mode = Some(v),
                (_, Some("ivgen-alg")) => ivgen_alg = Some(v),
                (_, Some("ivgen-hash-alg")) => ivgen_hash = Some(v),
                (_, Some("hash-alg")) => a.encrypt.hash = v,
                (_, Some("iter-time")) => {
                    a.encrypt.iter_time = v
                        .parse()
                        .map_err(|_| ToolError::BadArgument("iter-time is in milliseconds"))?
                }
                (_, Some("key-secret")) => {
                    let (_, file) =
                        secrets
                            .iter()
                            .find(|(id, _)| *id == v)
                            .ok_or(ToolError::BadArgument(
                                "key-secret names no --object secret",
                            ))?;
                    a.encrypt.key.key_secret_file = Some(file.clone());
                    a.encrypt.key.key_fd = None;
                }
                ("preallocation", _) => {
                    a.preallocation = match v.as_str() {
                        "off" => PreallocArg::Off,
                        "metadata" if a.format == CreateFormat::Raw => {
                            return Err(ToolError::BadArgument(
                                "Unsupported preallocation mode: metadata",
                            ))
                        }
                        "metadata" => PreallocArg::Metadata,
                        "falloc" | "full" => PreallocArg::Full,
                        _ => return Err(ToolError::BadArgument("Unsupported preallocation mode")),
                    }
                }
                ("backing_file", _) if a.format == CreateFormat::Qcow2 => a.backing = Some(v),
                ("backing_fmt", _) if a.format == CreateFormat::Qcow2 => a.backing_format = Some(v),
                ("cluster_size", _) if a.format == CreateFormat::Qcow2 => a.cluster_size = v,
                ("compat", _) if a.format == CreateFormat::Qcow2 => {
                    a.compat = match v.as_str() {
                        "v2" | "0.10" => "0.10".into(),
                        "v3" | "1.1" => "1.1".into(),
                        _ => return Err(ToolError::BadArgument("compat must be 0.10 or 1.1")),
                    }
                }
                ("lazy_refcounts", _) if a.format == CreateFormat::Qcow2 => {
                    a.lazy_refcounts = bool_opt(&v)?
                }
                ("extended_l2", _) if a.format == CreateFormat::Qcow2 => {
                    a.extended_l2 = bool_opt(&v)?
                }
                ("compression_type", _) if a.format == CreateFormat::Qcow2 => {
                    a.compression_type = match v.as_str() {
                        "zlib" => 0,
                        "zstd" => 1,
                        _ => {
                            return Err(ToolError::BadArgument("compression_type is zlib or zstd"))
                        }
                    }
                }
                ("refcount_bits", _) if a.format == CreateFormat::Qcow2 => {
                    a.refcount_bits = v
                        .parse()
                        .map_err(|_| ToolError::BadArgument("refcount_bits is a number"))?
                }
                _ => return Err(ToolError::InvalidParameter(k)),
            }
        }
    }
    if cipher_alg.is_some() || cipher_mode.is_some() || ivgen_alg.is_some() || ivgen_hash.is_some()
    {
        let alg = cipher_alg.unwrap_or_else(|| "aes-256".into());
        let mode = cipher_mode.unwrap_or_else(|| "xts".into());
        let iv = match (ivgen_alg.as_deref(), ivgen_hash.as_deref()) {
            (None, _) => "plain64".to_string(),
            (Some("essiv"), h) => format!("essiv:{}", h.unwrap_or("sha256")),
            (Some(g), _) => g.to_string(),
        };
        a.encrypt.cipher = if mode == "ecb" {
            format!("{alg}-{mode}")
        } else {
            format!("{alg}-{mode}-{iv}")
        };
    }
    // Applied: a second apply() is a no-op.
    a.options.clear();
    a.objects.clear();
    if a.format == CreateFormat::Luks {
        a.format = CreateFormat::Raw;
        a.encrypt.encrypt = Some(EncryptFormat::Luks);
    }
    Ok(a)
}
