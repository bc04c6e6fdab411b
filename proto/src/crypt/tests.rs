use super::*;

fn cheap() -> KdfParams {
    KdfParams {
        memory_kib: 1024,
        iterations: 1,
        parallelism: 1,
    }
}

fn keyring() -> Keyring {
    KeyFile::generate(None, cheap(), "now".into())
        .expect("generate")
        .1
}

fn block(seed: u8) -> Vec<u8> {
    (0..65_536u32).map(|i| (i % 97) as u8 ^ seed).collect()
}

#[test]
fn sealed_chunks_round_trip_and_hide_their_content() {
    let k = keyring();
    let codec = Codec::Sealed {
        keyring: Arc::new(k),
        pad: false,
    };
    let data = block(1);
    let id = codec.chunk_ids().of(&data);
    assert_ne!(id, BlockHash::of(&data), "ids are keyed");
    let env = codec.encode(id, &data).expect("encode");
    assert_eq!(codec.decode(id, &env, data.len()).expect("decode"), data);
    // Random nonces: the same block seals to different bytes each time.
    assert_ne!(codec.encode(id, &data).expect("encode"), env);
    // The zstd frame is not visible in the envelope.
    let frame = chunk::compress(&data).expect("compress");
    assert!(!env.windows(16).any(|w| w == &frame[frame.len() - 16..]));
    // Without the key: the check passes, a flipped byte anywhere is found.
    assert_eq!(Codec::check_stored(true, id, &env, data.len()), Ok(()));
    for at in [0, 5, 20, env.len() / 2, env.len() - 1] {
        let mut bad = env.clone();
        bad[at] ^= 1;
        assert!(
            Codec::check_stored(true, id, &bad, data.len()).is_err(),
            "flip at {at}"
        );
        assert!(codec.decode(id, &bad, data.len()).is_err(), "flip at {at}");
    }
}

#[test]
fn a_sealed_chunk_opens_only_under_its_own_key_and_name() {
    let a = Arc::new(keyring());
    let b = Arc::new(keyring());
    let ca = Codec::Sealed {
        keyring: a.clone(),
        pad: false,
    };
    let cb = Codec::Sealed {
        keyring: b,
        pad: false,
    };
    let data = block(2);
    let id = ca.chunk_ids().of(&data);
    assert_ne!(
        id,
        cb.chunk_ids().of(&data),
        "two keyrings name a block apart"
    );
    let env = ca.encode(id, &data).expect("encode");
    assert!(matches!(
        cb.decode(id, &env, data.len()),
        Err(ChunkError::OtherKey { .. })
    ));
    // Moved under another name (with a fresh check hash): the tag refuses it.
    let other = ca.chunk_ids().of(&block(3));
    assert!(matches!(
        ca.decode(other, &env, data.len()),
        Err(ChunkError::Unauthentic { .. })
    ));
    // A body changed by someone who also rewrote the check hash: still refused.
    let mut forged = env[..env.len() - CHECK_BYTES].to_vec();
    forged[HEADER_BYTES + 3] ^= 0x40;
    let check = blake3::hash(&forged);
    forged.extend_from_slice(check.as_bytes());
    assert_eq!(Codec::check_stored(true, id, &forged, data.len()), Ok(()));
    assert!(matches!(
        ca.decode(id, &forged, data.len()),
        Err(ChunkError::Unauthentic { .. })
    ));
    // A plain receiver check refuses an envelope, and a sealed check a plain frame.
    let frame = chunk::compress(&data).expect("compress");
    assert!(Codec::check_stored(false, id, &env, data.len()).is_err());
    assert!(Codec::check_stored(true, id, &frame, data.len()).is_err());
}

#[test]
fn padding_rounds_envelopes_to_buckets() {
    let codec = Codec::Sealed {
        keyring: Arc::new(keyring()),
        pad: true,
    };
    let mut sizes = std::collections::BTreeSet::new();
    for seed in 0..8u8 {
        // Blocks of different compressibility: the first `seed` 4 KiB pages are noise.
        let mut data = vec![seed + 1; 65_536];
        blake3::Hasher::new()
            .update(&[seed])
            .finalize_xof()
            .fill(&mut data[..4096 * usize::from(seed)]);
        let id = codec.chunk_ids().of(&data);
        let env = codec.encode(id, &data).expect("encode");
        assert_eq!(
            (env.len() - HEADER_BYTES - TAG_BYTES - CHECK_BYTES) % PAD_BUCKET,
            0
        );
        assert!(env.len() <= max_envelope_len(data.len()));
        assert_eq!(codec.decode(id, &env, data.len()).expect("decode"), data);
        sizes.insert(env.len());
    }
    assert!(
        sizes.len() > 1,
        "different compressibility still shows in buckets"
    );
}

#[test]
fn manifest_macs_bind_every_field() {
    let k = keyring();
    let base = Manifest {
        vm: "web",
        taken_us: 1,
        consistency: "crash-consistent",
        config_hash: config_hash("{}"),
        disks: vec![("vda", 1 << 20, 65_536, [7; 32])],
    };
    let mac = k.manifest_mac(&base);
    assert!(k.verify_manifest(&base, &mac));
    assert!(!k.verify_manifest(&base, &mac[..31]));
    let mut other = base.clone();
    other.disks[0].3 = [8; 32];
    assert_ne!(k.manifest_mac(&other), mac);
    let mut other = base.clone();
    other.taken_us = 2;
    assert_ne!(k.manifest_mac(&other), mac);
    let mut other = base.clone();
    other.vm = "web2";
    assert_ne!(k.manifest_mac(&other), mac);
    assert_ne!(keyring().manifest_mac(&base), mac);
}

#[test]
fn key_files_unlock_only_with_their_passphrase() {
    let (file, k) = KeyFile::generate(Some(b"correct horse"), cheap(), "t".into()).expect("gen");
    let text = file.to_json();
    let back = KeyFile::parse(&text).expect("parse");
    assert!(back.needs_passphrase());
    assert!(
        !text.contains(&hex::encode(k.ids_key())),
        "the file holds no derived key"
    );
    let again = back.unlock(Some(b"correct horse")).expect("unlock");
    let data = block(4);
    assert_eq!(again.chunk_ids().of(&data), k.chunk_ids().of(&data));
    assert!(matches!(
        back.unlock(Some(b"wrong")),
        Err(KeyFileError::WrongPassphrase)
    ));
    assert!(matches!(
        back.unlock(None),
        Err(KeyFileError::NeedsPassphrase)
    ));
    assert!(matches!(
        KeyFile::parse("{\"format\":\"x\"}"),
        Err(KeyFileError::Malformed(_))
    ));
}

#[test]
fn paper_keys_round_trip_and_name_a_mistyped_line() {
    let (file, k) = KeyFile::generate(Some(b"pw"), cheap(), "t".into()).expect("gen");
    let paper = file.to_paper();
    let back = KeyFile::from_paper(&paper).expect("from paper");
    assert_eq!(back, file);
    let data = block(5);
    let again = back.unlock(Some(b"pw")).expect("unlock");
    assert_eq!(again.chunk_ids().of(&data), k.chunk_ids().of(&data));
    // One character of line 3 changed.
    let typo: String = paper
        .lines()
        .map(|l| {
            if l.starts_with("003") {
                let mut c: Vec<char> = l.chars().collect();
                c[5] = if c[5] == 'a' { 'b' } else { 'a' };
                c.into_iter().collect::<String>()
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    match KeyFile::from_paper(&typo) {
        Err(KeyFileError::Paper { line, .. }) => assert_eq!(line, 3),
        other => panic!("{other:?}"),
    }
}

#[test]
fn write_only_keyrings_seal_what_only_the_recovery_key_opens() {
    let full = keyring();
    let r = RecoveryKey::generate();
    let wo = full.write_only_for(r.public());
    assert!(wo.write_only());
    let data = block(6);
    let (session, all) = wo.for_session();
    // The full keyring's data key (carried) and the session's own.
    assert_eq!(all.len(), 2);
    let wrapped = all[1].clone();
    let codec = Codec::Sealed {
        keyring: Arc::new(session),
        pad: false,
    };
    let id = codec.chunk_ids().of(&data);
    assert_eq!(id, full.chunk_ids().of(&data), "one keyring, one naming");
    let env = codec.encode(id, &data).expect("encode");
    // Neither the write-only keyring itself nor the full key file opens it.
    for k in [wo.clone(), full.clone()] {
        let c = Codec::Sealed {
            keyring: Arc::new(k),
            pad: false,
        };
        assert!(matches!(
            c.decode(id, &env, data.len()),
            Err(ChunkError::OtherKey { .. })
        ));
    }
    // The recovery key does, from the wrapped copy alone.
    let opened = r
        .open_keyring(full.id(), std::slice::from_ref(&wrapped))
        .expect("unwraps");
    let c = Codec::Sealed {
        keyring: Arc::new(opened),
        pad: false,
    };
    assert_eq!(c.decode(id, &env, data.len()).expect("decode"), data);
    // Chunks the full keyring sealed before the write-only agent took over (which its points
    // reuse) open with the recovery key too, through the carried key.
    let before = block(10);
    let full_codec = Codec::Sealed {
        keyring: Arc::new(full.clone()),
        pad: false,
    };
    let old_id = full_codec.chunk_ids().of(&before);
    let old_env = full_codec.encode(old_id, &before).expect("encode");
    let both = Codec::Sealed {
        keyring: Arc::new(r.open_keyring(full.id(), &all).expect("unwraps")),
        pad: false,
    };
    assert_eq!(
        both.decode(old_id, &old_env, before.len()).expect("old"),
        before
    );
    assert_eq!(both.decode(id, &env, data.len()).expect("new"), data);
    // A key wrapped by someone else for this keyring id (their own id and manifest keys):
    // the id does not commit to them, so it is not taken.
    let forger = keyring();
    let forged = r
        .public()
        .wrap(
            full.id(),
            &DataKey::random(),
            forger.ids_key(),
            forger.manifest_key(),
        )
        .expect("wrap");
    assert!(r.open_keyring(full.id(), &[forged]).is_none());
    // A low-order point is no recovery key.
    assert!(RecoveryPublic::from_slice(&[0u8; 32]).is_none());
    let mut one = [0u8; 32];
    one[0] = 1;
    assert!(RecoveryPublic::from_slice(&one).is_none());
    assert!(RecoveryPublic::from_slice(r.public().as_bytes()).is_some());
    // Another recovery key, another keyring id, a changed byte: nothing unwraps.
    assert!(RecoveryKey::generate()
        .open_keyring(full.id(), std::slice::from_ref(&wrapped))
        .is_none());
    assert!(r
        .open_keyring(keyring().id(), std::slice::from_ref(&wrapped))
        .is_none());
    let mut bad = wrapped.clone();
    bad.blob[60] ^= 1;
    assert!(r.open_keyring(full.id(), &[bad]).is_none());
    // Rewrapped to a new recovery key: the new one opens it, the old one no longer does.
    let r2 = RecoveryKey::generate();
    let again = r.rewrap(full.id(), &wrapped, &r2.public()).expect("rewrap");
    assert!(r2
        .open_keyring(full.id(), std::slice::from_ref(&again))
        .is_some());
    assert!(r.open_keyring(full.id(), &[again]).is_none());
}

#[test]
fn a_rotated_keyring_reads_old_and_new_chunks_the_old_one_only_old() {
    let k1 = keyring();
    let k2 = k1.rotated();
    let (old, new) = (block(7), block(8));
    let c1 = Codec::Sealed {
        keyring: Arc::new(k1),
        pad: false,
    };
    let c2 = Codec::Sealed {
        keyring: Arc::new(k2),
        pad: false,
    };
    let (i1, i2) = (c1.chunk_ids().of(&old), c2.chunk_ids().of(&new));
    assert_eq!(i1, c2.chunk_ids().of(&old), "names do not change");
    let (e1, e2) = (
        c1.encode(i1, &old).expect("e1"),
        c2.encode(i2, &new).expect("e2"),
    );
    assert_eq!(c2.decode(i1, &e1, old.len()).expect("old"), old);
    assert_eq!(c2.decode(i2, &e2, new.len()).expect("new"), new);
    assert!(matches!(
        c1.decode(i2, &e2, new.len()),
        Err(ChunkError::OtherKey { .. })
    ));
}

#[test]
fn key_files_of_every_kind_round_trip() {
    let r = RecoveryKey::generate();
    let k = keyring().with_recovery(r.public()).rotated();
    for k in [k.clone(), k.write_only_for(r.public())] {
        let f = KeyFile::of_keyring(&k, Some(b"pw"), cheap(), "t".into()).expect("file");
        let back = KeyFile::parse(&f.to_json())
            .expect("parse")
            .unlock(Some(b"pw"))
            .expect("unlock");
        assert_eq!(back.id(), k.id());
        assert_eq!(back.write_only(), k.write_only());
        assert_eq!(back.data_keys().len(), k.data_keys().len());
        assert_eq!(back.recovery(), Some(&r.public()));
        let data = block(9);
        assert_eq!(back.chunk_ids().of(&data), k.chunk_ids().of(&data));
    }
    let f = KeyFile::of_recovery(&r, None, cheap(), "t".into()).expect("file");
    let back = KeyFile::parse(&f.to_json()).expect("parse");
    assert_eq!(back.recovery_public().expect("public"), r.public());
    assert_eq!(
        back.unlock_recovery(None).expect("unlock").public(),
        r.public()
    );
    assert!(matches!(back.unlock(None), Err(KeyFileError::Kind(..))));
    // A sealed configuration opens only with the keyring, and only for its VM.
    let text = r#"{"source":"files","disks":[{"path":"/srv/web1.raw"}]}"#;
    let sealed = k.seal_config("web1", text).expect("seal");
    assert!(!sealed.contains("web1.raw"));
    assert_eq!(k.open_config("web1", &sealed).expect("open"), text);
    assert!(k.open_config("web2", &sealed).is_err());
    assert!(keyring().open_config("web1", &sealed).is_err());
}
