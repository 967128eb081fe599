"""The wire format against byte strings written by hand from the spec in dllama/net/protocol.py."""

import numpy as np
import pytest

from dllama.net import protocol as P

# (message, its frame), each frame spelled out field by field: header "<BBHI" type, 0, meta_len, payload_len
GOLDEN = [
    (P.Hello(7, 1, 2, bytes(range(32))),
     "01 00 2f00 00000000" "444c4d41 0700 0100 0200" + bytes(range(32)).hex() + "ff 00000000"),
    (P.Hello(7, 1, 2, bytes(range(32)), "q40", 576),
     "01 00 2f00 00000000" "444c4d41 0700 0100 0200" + bytes(range(32)).hex() + "02 40020000"),
    (P.HelloAck(7), "02 00 3200 00000000" "0700" + "00" * 48),
    (P.HelloAck(7, 1.5, 4096, b"\xab" * 32),
     "02 00 3200 00000000" "0700 000000000000f83f 0010000000000000" + "ab" * 32),
    (P.Refuse("busy"), "03 00 0400 00000000" "62757379"),
    (P.Config({"b": [1, 2], "a": "x"}), "04 00 0000 13000000" + b'{"a":"x","b":[1,2]}'.hex()),
    (P.Weight("norm", "f32", (2,), 0, 8, np.array([1.0, -2.0], "<f4").tobytes()),
     "05 00 1a00 08000000" "0000000000000000 0800000000000000 00 01 02000000 6e6f726d" "0000803f 000000c0"),
    (P.Weight("l.wq", "q40", (2, 64), 36, 72, bytes(range(36))),
     "05 00 1e00 24000000" "2400000000000000 4800000000000000 02 02 02000000 40000000 6c2e7771" + bytes(range(36)).hex()),
    (P.Ready(), "06 00 0000 00000000"),
    (P.Step(np.array([5, 6], np.int32), slots=np.array([0, 3], np.int32), out_rows=2),
     "07 00 1300 10000000" "02000000 01 0000 0000000000000000 02000000" "05000000 06000000" "00000000 03000000"),
    (P.Step(np.array([7], np.int32), P.LOGITS_TOP, 64, 0.5, np.array([1], np.int32)),
     "07 00 1300 08000000" "01000000 02 4000 000000000000e03f 01000000" "07000000" "01000000"),
    # a batch whose first output row wants its full logits and second its top 64 at temperature 0.5
    (P.Step(np.array([5, 6], np.int32), P.LOGITS_ROWS, 0, 0.0, np.array([0, 3], np.int32), 2,
            np.array([0.0, 0.5]), np.array([0, 64], np.int32)),
     "07 00 1300 28000000" "02000000 03 0000 0000000000000000 02000000" "05000000 06000000" "00000000 03000000"
     "0000000000000000 000000000000e03f" "00000000 40000000"),
    # its answer from a slice of 3 logits: row 0 whole, row 1 one candidate (token 5, logit 1) and m 2, s 3
    (P.Buffer(P.OP_ROWS, "f32", 2, 3, bytes.fromhex(
        "0000000000000000 0000000000000000 00000000" "0000000000000040 0000000000000840 01000000"
        "0000803f 00000040 00004040" "05000000 0000803f".replace(" ", ""))),
     "08 00 0a00 3c000000" "06 00 02000000 03000000"
     "0000000000000000 0000000000000000 00000000" "0000000000000040 0000000000000840 01000000"
     "0000803f 00000040 00004040" "05000000 0000803f"),
    (P.Buffer(P.OP_TOP, "f32", 1, 512, np.array([2.0, 3.0], "<f8").tobytes() + bytes.fromhex("05000000 0000803f")),
     "08 00 0a00 18000000" "04 00 01000000 00020000" "0000000000000040 0000000000000840" "05000000 0000803f"),
    (P.Buffer(P.OP_FULL, "f32", 0, 0), "08 00 0a00 00000000" "05 00 00000000 00000000"),
    (P.Buffer(P.OP_REDUCE, "f32", 1, 2, np.array([1.0, -2.0], "<f4").tobytes()),
     "08 00 0a00 08000000" "02 00 01000000 02000000" "0000803f 000000c0"),
    (P.Bye(), "09 00 0000 00000000"),
    (P.Probe(), "0a 00 0600 00000000" "444c4d41 0700"),
    (P.ProbeInfo({"state": "idle"}), "0b 00 0000 10000000" + b'{"state":"idle"}'.hex()),
    (P.Challenge(b"\x01" * 32, b"\xee" * 32), "0c 00 4000 00000000" + "01" * 32 + "ee" * 32),
    (P.Challenge(b"\x01" * 32, b"\xee" * 32, b'{"n_nodes":2}'),
     "0c 00 4d00 00000000" + "01" * 32 + "ee" * 32 + b'{"n_nodes":2}'.hex()),
    (P.Auth(b"\x5a" * 32), "0d 00 2000 00000000" + "5a" * 32),
    (P.Ping(), "0e 00 0000 00000000"),
    (P.Release(2, 17), "0f 00 0800 00000000" "02000000 11000000"),
    (P.Times(3_000_000_000, 5), "10 00 1000 00000000" "005ed0b200000000 0500000000000000"),
]


def _same(a, b) -> bool:
    if type(a) is not type(b):
        return False
    for k, va in vars(a).items():
        vb = getattr(b, k)
        if isinstance(va, (bytes, bytearray, memoryview, np.ndarray)) or isinstance(vb, (memoryview, np.ndarray)):
            if bytes(memoryview(va).cast("B")) != bytes(memoryview(vb).cast("B")):
                return False
        elif (tuple(va) if isinstance(va, (list, tuple)) else va) != (tuple(vb) if isinstance(vb, (list, tuple)) else vb):
            return False
    return True


@pytest.mark.parametrize("msg,frame", GOLDEN, ids=[type(m).__name__ for m, _ in GOLDEN])
def test_encode_matches_golden_bytes(msg, frame):
    assert P.encode_bytes(msg) == bytes.fromhex(frame.replace(" ", ""))


@pytest.mark.parametrize("msg,frame", GOLDEN, ids=[type(m).__name__ for m, _ in GOLDEN])
def test_decode_golden_bytes(msg, frame):
    assert _same(P.decode(bytes.fromhex(frame.replace(" ", ""))), msg)


def test_decoder_byte_by_byte_and_clean_close():
    stream = b"".join(bytes.fromhex(f.replace(" ", "")) for _, f in GOLDEN)
    dec, got = P.Decoder(), []
    for i in range(len(stream)):
        got += dec.feed(stream[i:i + 1])
    dec.close()  # between frames: a clean close
    assert len(got) == len(GOLDEN) and all(_same(g, m) for g, (m, _) in zip(got, GOLDEN))


def test_close_mid_frame_is_told_apart():
    frame = P.encode_bytes(P.Step(np.array([1, 2, 3], np.int32)))
    for cut in (1, P.HEADER.size, len(frame) - 1):
        dec = P.Decoder()
        assert dec.feed(frame[:cut]) == []
        with pytest.raises(P.ClosedMidFrame):
            dec.close()


@pytest.mark.parametrize("head", [
    "ff 00 0000 00000000",          # unknown type
    "00 00 0000 00000000",          # type 0 does not exist
    "06 01 0000 00000000",          # reserved byte set
    "47 45 5420 2f204854",          # "GET / HT": an HTTP client on the port
])
def test_garbage_header_refused(head):
    with pytest.raises(P.ProtocolError):
        P.Decoder().feed(bytes.fromhex(head.replace(" ", "")))


def test_frame_over_the_size_limit_refused_from_its_header():
    head = P.HEADER.pack(P.BUFFER, 0, P.BUFFER_META.size, P.MAX_PAYLOAD + 1)
    with pytest.raises(P.ProtocolError, match="limit"):
        P.Decoder().feed(head)   # refused before any of the payload is read
    with pytest.raises(P.ProtocolError, match="limit"):
        P.encode(P.Buffer(P.OP_BROADCAST, "f32", 1, 1, bytes(P.MAX_PAYLOAD + 4)))


@pytest.mark.parametrize("frame,match", [
    ("01 00 2a00 00000000" "58585858 0300 0100 0200" + "00" * 32, "magic"),           # HELLO, bad magic
    ("01 00 0800 00000000" "444c4d41 0700 0100", "malformed"),                         # HELLO, short meta
    ("0c 00 2000 00000000" + "00" * 32, "malformed"),                                  # CHALLENGE, no proof
    ("0e 00 0000 01000000" "00", "no data"),                                           # PING with a payload
    ("08 00 0a00 04000000" "02 00 01000000 02000000" "0000803f", "carries"),           # BUFFER 1x2 f32, 4 bytes
    ("08 00 0a00 22000000" "01 01 01000000 10000000" + "00" * 34, "multiple of 32"),   # q80, 16 columns
    ("07 00 1300 08000000" "02000000 01 0000 0000000000000000 01000000" "05000000 00000000", "carries"),  # STEP of 2, 1 row
    ("07 00 1300 08000000" "01000000 02 0000 0000000000000000 01000000" "05000000 00000000", "top 0"),  # top, k 0
    ("07 00 1300 08000000" "01000000 04 0000 0000000000000000 01000000" "05000000 00000000", "logits 4"),
    ("07 00 1300 10000000" "02000000 03 0000 0000000000000000 02000000" + "00" * 16, "carries"),  # rows, no k
    ("07 00 1300 28000000" "02000000 03 4000 0000000000000000 02000000" + "00" * 40, "per row"),  # k in meta
    ("07 00 1300 28000000" "02000000 03 0000 0000000000000000 02000000" + "00" * 32 + "00000000 ffffffff",
     "rows ask"),                                                                      # a row's k is -1
    ("08 00 0a00 14000000" "06 00 01000000 03000000" "0000000000000000 0000000000000000 04000000",
     "carries"),                                                                       # 4 candidates of 3
    ("08 00 0a00 18000000" "06 00 01000000 03000000" + "00" * 20 + "0000803f", "carries"),  # 1 of 3 logits
    ("07 00 1300 08000000" "01000000 01 0000 0000000000000000 02000000" "05000000 00000000", "2 rows"),  # logits of 2 of 1
    ("07 00 1300 10000000" "02000000 02 0100 0000000000000000 02000000" + "00" * 16, "2 rows"),  # top of 2 rows
    ("0f 00 0400 00000000" "02000000", "malformed"),                                   # RELEASE, short meta
    ("10 00 0800 00000000" "0500000000000000", "malformed"),                           # TIMES, one counter
    ("10 00 1000 01000000" + "00" * 17, "no payload"),                                 # TIMES with a payload
    ("05 00 1a00 08000000" "0000000000000000 0400000000000000 00 01 02000000 6e6f726d" + "00" * 8, "fit"),
    ("06 00 0000 01000000" "00", "no data"),                                           # READY with a payload
])
def test_inconsistent_frames_refused(frame, match):
    with pytest.raises(P.ProtocolError, match=match):
        P.decode(bytes.fromhex(frame.replace(" ", "")))


def test_sizes_follow_the_block_formats():
    # ggml: Q4_0 block 18 bytes, Q4_1 20, Q8_0 34 per 32 values
    assert P.tensor_nbytes("q40", (4, 64)) == 4 * 2 * 18
    assert P.tensor_nbytes("q41", (64,)) == 40
    assert P.tensor_nbytes("f16", (3, 5)) == 30
    assert P.buffer_nbytes("q80", 2, 64) == 2 * 2 * 34
    with pytest.raises(P.ProtocolError):
        P.tensor_nbytes("q40", (1, 48))


@pytest.mark.parametrize("version,frame", [
    (1, "01 00 0a00 00000000" "444c4d41 0100 0100 0200"),                        # 10-byte HELLO
    (2, "01 00 2a00 00000000" "444c4d41 0200 0100 0200" + "00" * 32),            # with a nonce
    (3, "01 00 2a00 00000000" "444c4d41 0300 0100 0200" + "00" * 32),            # one slot per pass, no local slices
    (5, "01 00 2f00 00000000" "444c4d41 0500 0100 0200" + "00" * 32 + "ff 00000000"),  # batches gather full logits
    (6, "01 00 2f00 00000000" "444c4d41 0600 0100 0200" + "00" * 32 + "ff 00000000"),  # x broadcast at every sync
])
def test_older_hellos_are_read_for_their_version(version, frame):
    """A root of an older protocol: the worker must still read its version to say which."""
    hello = P.decode(bytes.fromhex(frame.replace(" ", "")))
    assert hello.version == version


def test_proofs_are_hmac_sha256_of_the_documented_transcript():
    import hashlib
    import hmac

    from dllama.net import auth

    key, rn, wn = b"k" * 16, bytes(range(32)), bytes(range(32, 64))
    hello = P.Hello(4, 1, 4, rn, "q80", 64)
    transcript = b"DLMA" + bytes.fromhex("0400 0100 0400 04 40000000".replace(" ", "")) + rn + wn
    assert auth.worker_proof(key, hello, wn) == hmac.new(key, b"dllama worker proof\0" + transcript,
                                                         hashlib.sha256).digest()
    assert auth.root_proof(key, hello, wn) == hmac.new(key, b"dllama root proof\0" + transcript,
                                                       hashlib.sha256).digest()
    # a reflected proof (the worker's sent back as the root's) and a proof for other nonces both fail
    assert auth.worker_proof(key, hello, wn) != auth.root_proof(key, hello, wn)
    assert auth.root_proof(key, hello, bytes(32)) != auth.root_proof(key, hello, wn)
    assert auth.root_proof(b"other", hello, wn) != auth.root_proof(key, hello, wn)
    # the calibration report (--split auto) is covered too: speed and free memory, in this session
    report = hmac.new(key, b"dllama worker report\0" + transcript + bytes.fromhex("000000000000f83f 0010000000000000"
                                                                                   .replace(" ", "")),
                      hashlib.sha256).digest()
    assert auth.report_mac(key, hello, wn, 1.5, 4096) == report
    assert auth.report_mac(key, hello, wn, 3.0, 4096) != report
    # and so is what the root asked to be calibrated: another qtype is another transcript
    assert auth.worker_proof(key, P.Hello(4, 1, 4, rn, "q40", 64), wn) != auth.worker_proof(key, hello, wn)


def test_proofs_cover_the_local_slice_announcement():
    """A peer in between cannot add, drop or alter a worker's local slice announcement unnoticed."""
    import hashlib
    import hmac

    from dllama.net import auth

    key, rn, wn, local = b"k" * 16, bytes(range(32)), bytes(range(32, 64)), b'{"node_index":1}'
    hello = P.Hello(4, 1, 2, rn)
    transcript = b"DLMA" + bytes.fromhex("040001000200" "ff00000000") + rn + wn + local
    assert auth.worker_proof(key, hello, wn, local) == hmac.new(key, b"dllama worker proof\0" + transcript,
                                                                hashlib.sha256).digest()
    assert auth.root_proof(key, hello, wn, local) == hmac.new(key, b"dllama root proof\0" + transcript,
                                                              hashlib.sha256).digest()
    assert auth.worker_proof(key, hello, wn, local) != auth.worker_proof(key, hello, wn)
    assert auth.root_proof(key, hello, wn, local) != auth.root_proof(key, hello, wn, b'{"node_index":2}')
