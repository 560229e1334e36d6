import struct
import zlib

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cxrtune import dicom, images
from cxrtune.errors import ImageDecodeError, ImageTooLargeError, UnsupportedFormatError


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge size but carries no real pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return images.PNG_MAGIC + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b"")


def test_8_and_16_bit_png_keep_their_levels():
    g8 = np.arange(256, dtype=np.uint8).reshape(16, 16)
    g16 = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)
    assert np.allclose(images.decode_image(images.encode_png(g8)), g8 / 255.0)
    assert np.allclose(images.decode_image(images.encode_png(g16)), g16 / 65535.0)


def test_jpeg_and_rgb_become_grey():
    rgb = np.full((32, 32, 3), 128, np.uint8)
    ok, jpg = cv2.imencode(".jpg", rgb)
    out = images.decode_image(jpg.tobytes())
    assert out.shape == (32, 32) and abs(out.mean() - 128 / 255) < 0.02


def test_hostile_inputs_get_clear_errors():
    with pytest.raises(UnsupportedFormatError):
        images.decode_image(b"GIF89a....")
    with pytest.raises(ImageDecodeError, match="empty"):
        images.decode_image(b"")
    good = images.encode_png(np.zeros((64, 64), np.uint8))
    with pytest.raises(ImageDecodeError):
        images.decode_image(good[:40])
    with pytest.raises(ImageTooLargeError, match="MP"):
        images.decode_image(png_header_only(100_000, 100_000))
    with pytest.raises(ImageTooLargeError, match="MB"):
        images.decode_image(good, dicom.Limits(max_bytes=10))


def test_mask_is_bool():
    m = np.zeros((8, 8), bool)
    m[2:4, 2:4] = True
    assert np.array_equal(images.decode_mask(images.encode_png(m)), m)


def _with_sbit(png: bytes, bits: int) -> bytes:
    """``png`` with an sBIT chunk (grey significant bits) inserted after IHDR, as a PNG writer
    that stores 12-bit data unscaled writes it."""
    import struct
    import zlib

    ihdr_end = 8 + 12 + 13
    chunk = struct.pack(">I4sB", 1, b"sBIT", bits) + struct.pack(">I", zlib.crc32(b"sBIT" + bytes([bits])))
    return png[:ihdr_end] + chunk + png[ihdr_end:]


def test_a_12_or_16_bit_copy_gives_its_8_bit_copys_working_image_exactly():
    """What the stages see (the working image, here resized from 1,300 px to 1,024) is the 8-bit
    copy's to the bit for 12-bit data in a 16-bit PNG and for 16-bit data scaled from 8 bits: the
    same record follows. (Resampled at 12-bit precision, Stage II's input differed in roundings
    and a real CXR's zone opacity fraction moved by 0.07: bench/plausibility.py, twelve_bit_png.)"""
    from cxrtune.preprocessing import load_scan

    rng = np.random.default_rng(3)
    g8 = cv2.GaussianBlur(rng.integers(0, 256, (1300, 1100), dtype=np.uint8), (0, 0), 3)
    eight = load_scan(images.encode_png(g8)).image
    assert eight.shape == (1024, 866)
    for copy in ((g8.astype(np.int64) * 4095 // 255).astype(np.uint16), g8.astype(np.uint16) * 257):
        assert np.array_equal(load_scan(images.encode_png(copy)).image, eight)


def test_12_bit_data_in_a_16_bit_png_is_read_at_its_own_scale():
    """COVID-QU-Ex-like 8-bit levels stored as 12-bit data in a 16-bit PNG: read as its 8-bit copy
    is (not divided by 65535, which left it at 6 % of full scale and scored as clear lungs)."""
    g8 = np.tile(np.arange(256, dtype=np.uint8), (16, 1))
    g12 = (g8.astype(np.int64) * 4095 // 255).astype(np.uint16)
    png12 = images.encode_png(g12)
    eight = images.decode_image(images.encode_png(g8))
    assert images.png_significant_bits(png12) is None
    assert np.abs(images.decode_image(png12) - eight).max() < 1 / 255  # no sBIT: the 12-bit rule
    with_sbit = _with_sbit(png12, 12)
    assert images.png_significant_bits(with_sbit) == 12
    assert np.abs(images.decode_image(with_sbit) - eight).max() < 1 / 255
    # a conforming writer scaled to 16 bits (and says 12 significant bits): full scale is 65535
    g16 = (g8.astype(np.uint16) * 257).astype(np.uint16)
    assert np.allclose(images.decode_image(_with_sbit(images.encode_png(g16), 12)), g16 / 65535.0)
    assert np.allclose(images.decode_image(images.encode_png(g16)), g16 / 65535.0)
    # unscaled 10-bit data; sBIT 14 over data that fits in it
    g10 = (g8.astype(np.int64) * 1023 // 255).astype(np.uint16)
    assert np.abs(images.decode_image(images.encode_png(g10)) - eight).max() < 1 / 255
    assert np.allclose(images.decode_image(_with_sbit(png12, 14)), g12 / 16383.0)
    # 8-bit values copied into a 16-bit PNG unscaled: read as the 8-bit image, not at 1/4 of full scale
    assert np.allclose(images.decode_image(images.encode_png(g8.astype(np.uint16))), eight)


def test_jpeg_exif_orientation_is_applied():
    """A radiograph stored sideways with an EXIF orientation tag (6: rotate 90 degrees clockwise to
    display) decodes upright, as a viewer shows it."""
    import io

    from PIL import Image

    upright = np.zeros((64, 48), np.uint8)
    upright[:16, :] = 255  # a bright band at the top
    sideways = np.rot90(upright, 1)  # stored rotated 90 degrees anticlockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(sideways)).save(buf, format="JPEG", quality=95, exif=exif)
    decoded = images.decode_image(buf.getvalue())
    assert decoded.shape == upright.shape
    assert np.abs(decoded - upright / 255.0).mean() < 0.02


def test_at_most_two_images_decode_at_once(monkeypatch):
    """Decodes share DECODE_SLOTS: six threads decoding at once (as the Serve ingress does) never
    have more than two pixel decoders running."""
    import threading

    running, peak, release = [0], [0], threading.Event()
    lock = threading.Condition()
    real = images.decode_raster

    def slow_decoder(data, limits, **options):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            lock.notify_all()
        release.wait(30)
        with lock:
            running[0] -= 1
        return real(data, limits, **options)
    monkeypatch.setattr(images, "decode_raster", slow_decoder)
    png = images.encode_png(np.full((8, 8), 7, np.uint8))
    threads = [threading.Thread(target=images.decode_image, args=(png,)) for _ in range(6)]
    for t in threads:
        t.start()
    with lock:
        assert lock.wait_for(lambda: running[0] == 2, timeout=30)
        assert not lock.wait_for(lambda: running[0] > 2, timeout=0.5)  # the others wait for a slot
    release.set()
    for t in threads:
        t.join(30)
    assert peak[0] == 2 and running[0] == 0


def _seed_files() -> list[bytes]:
    """Valid inputs of each format the entry point takes, for the fuzzer to damage."""
    import io

    import pydicom
    from PIL import Image
    from pydicom.data import get_testdata_file
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

    g = np.tile(np.linspace(0, 1, 48, dtype=np.float32), (40, 1))
    jpeg = io.BytesIO()
    Image.fromarray((g * 255).astype(np.uint8)).save(jpeg, format="JPEG")
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))  # a CR chest PA, cropped to 96 x 80
    ds.PixelData = np.ascontiguousarray(ds.pixel_array[:96, :80]).tobytes()
    ds.Rows, ds.Columns = 96, 80
    dicoms = []
    for syntax in (ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        ds.file_meta.TransferSyntaxUID = syntax
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        dicoms.append(buf.getvalue())
    return [images.encode_png(g), images.encode_png((g * 255).astype(np.uint8)), jpeg.getvalue(), *dicoms]


@settings(max_examples=300, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 4), flips=st.lists(st.tuples(st.integers(0, 1500), st.integers(0, 255)), max_size=12),  # the headers
       cut=st.integers(0, 2**31), tail=st.binary(max_size=64))
def test_the_decoding_entry_point_lets_only_cxrtunes_errors_out(seed, flips, cut, tail):
    """Damaged PNG, JPEG and DICOM (flipped bytes, cut short, junk appended) go through
    ``load_scan``, the entry point of every caller: a Scan, or one of cxrtune's own errors with a
    plain reason; never another exception (a 500, a stopped batch)."""
    from cxrtune.errors import CxrtuneError
    from cxrtune.preprocessing import load_scan

    data = bytearray(SEEDS[seed])
    for position, value in flips:
        data[position % len(data)] = value
    data = bytes(data[: max(8, cut % (len(data) + 1))]) + tail
    try:
        load_scan(data, dicom.Limits(max_pixels=4 * 1024 * 1024, max_decoded_bytes=8 * 1024 * 1024))
    except CxrtuneError:
        pass


SEEDS = _seed_files()


def test_a_colour_photograph_is_refused_but_a_radiograph_stored_as_rgb_is_not():
    """One rule for colour (docs/scoring.md): luminance, unless the pixels stray far from grey
    (a photograph). Masks drawn in colour stay masks."""
    from pathlib import Path

    import matplotlib

    from cxrtune.errors import InputRefused

    photo = (Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").read_bytes()
    with pytest.raises(InputRefused, match="a photograph, not a radiograph"):
        images.decode_image(photo)
    grey = np.tile(np.linspace(0, 255, 256, dtype=np.uint8), (256, 1))
    tinted = np.stack([grey, grey, np.clip(grey.astype(int) + 3, 0, 255).astype(np.uint8)], axis=-1)  # a slight tint
    assert images.decode_image(images.encode_png(tinted)).shape == (256, 256)
    red = np.zeros((64, 64, 3), np.uint8)
    red[16:48, 16:48, 2] = 255  # a red mask (BGR)
    assert images.decode_mask(images.encode_png(red)).sum() == 32 * 32


def test_a_png_that_would_decode_past_the_limit_is_refused_before_decoding(monkeypatch):
    """A 16-bit RGBA PNG takes 8 bytes a pixel: its decoded size comes from IHDR and is checked
    against ``max_decoded_bytes`` before the decoder runs (a counting decoder is never called)."""
    from cxrtune.dicom import Limits

    calls = []
    real = images.cv2.imdecode
    monkeypatch.setattr(images.cv2, "imdecode", lambda *a, **k: calls.append(1) or real(*a, **k))
    limits = Limits(max_decoded_bytes=400_000)
    rgba16 = images.encode_png(np.zeros((256, 256, 4), np.uint16))  # 524 kB decoded, a few kB stored
    with pytest.raises(images.ImageTooLargeError, match="would decode to 1 MB"):
        images.decode_image(rgba16, limits)
    assert calls == []
    grey8 = np.tile(np.arange(256, dtype=np.uint8), (256, 1))  # 65 kB decoded
    assert images.decode_image(images.encode_png(grey8), limits).shape == (256, 256) and calls == [1]


def test_a_jpeg_mask_keeps_its_shape_and_a_labelled_one_both_lungs():
    """A mask saved as JPEG rings around its edges (values 1-127 around a 255 blob): read at half
    its brightest level it keeps its area; a labelled mask (0, 1 right lung, 2 left) keeps both."""
    import cv2

    blob = np.zeros((64, 64), np.uint8)
    blob[17:47, 17:47] = 255  # 900 pixels
    ok, jpeg = cv2.imencode(".jpg", blob, [cv2.IMWRITE_JPEG_QUALITY, 75])
    assert ok and (cv2.imdecode(jpeg, cv2.IMREAD_GRAYSCALE) > 0).sum() > 950  # what "> 0" read: swollen
    assert abs(int(images.decode_mask(jpeg.tobytes()).sum()) - 900) <= 10
    labelled = np.zeros((64, 64), np.uint8)
    labelled[10:50, 5:25], labelled[10:50, 40:60] = 1, 2
    assert images.decode_mask(images.encode_png(labelled)).sum() == 1600
