import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from cxrtune import zones


def two_lungs(h: int = 200, w: int = 200) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[30:170, 20:85] = True  # image-left = patient's right
    m[40:160, 115:180] = True
    return m


def test_opacity_in_upper_third_of_right_lung_is_exactly_zone_a():
    lung = two_lungs()
    right = zones.split_lungs(lung).right
    y_top, _ = zones.equal_area_zones(right)
    opacity = np.zeros_like(lung)
    opacity[30:y_top, 20:85] = True
    rec = zones.score_masks(lung, opacity, threshold=0.5)
    assert rec["score"] == 1
    assert [z for z, v in rec["zones"].items() if v["affected"]] == ["A"]
    assert rec["zones"]["A"]["opacity_fraction"] == 1.0
    assert rec["lungs"]["right"]["grade"] == 2 and rec["lungs"]["left"]["grade"] == 0
    assert rec["lungs_found"] == 2


def test_sides_follow_the_image_and_flip_swaps_them():
    lung = two_lungs()
    opacity = np.zeros_like(lung)
    opacity[150:170, 20:85] = True  # lower right lung
    assert zones.score_masks(lung, opacity, 0.1)["zones"]["C"]["affected"]
    flipped = zones.score_masks(lung[:, ::-1], opacity[:, ::-1], 0.1)
    assert flipped["zones"]["F"]["affected"] and not flipped["zones"]["C"]["affected"]


def test_no_lungs_one_blob_and_tiny_blobs_never_crash():
    empty = np.zeros((50, 50), bool)
    rec = zones.score_masks(empty, empty, 0.1)
    assert rec["score"] == 0 and rec["lungs_found"] == 0 and rec["opacity_percent"] == 0
    one = np.zeros((100, 100), bool)
    one[20:80, 10:40] = True
    pair = zones.split_lungs(one)
    assert pair.lungs_found == 1 and pair.right.any() and not pair.left.any()
    merged = np.zeros((100, 100), bool)
    merged[20:80, 10:90] = True
    merged[20:80, 48:52] = False
    merged[40:50, 48:52] = True  # a bridge joins the lungs
    pair = zones.split_lungs(merged)
    assert pair.lungs_found == 2 and pair.right[:, :45].any() and pair.left[:, 55:].any()
    noisy = two_lungs()
    noisy[5:7, 5:7] = True
    pair = zones.split_lungs(noisy)
    assert pair.lungs_found == 2 and not pair.right[5:7, 5:7].any()


@settings(max_examples=60, deadline=None)
@given(top=st.integers(0, 60), left=st.integers(0, 60), h=st.integers(12, 120), w=st.integers(3, 60),
       dy=st.integers(0, 40), dx=st.integers(0, 40))
def test_equal_area_zones_within_one_row_and_translation_invariant(top, left, h, w, dy, dx):
    rng = np.random.default_rng(top * 1000 + left)
    canvas = np.zeros((260, 200), bool)
    widths = np.clip(w + rng.integers(-2, 3, h), 1, None)
    for r in range(h):
        canvas[top + r, left:left + widths[r]] = True
    y1, y2 = zones.equal_area_zones(canvas)
    areas = [canvas[:y1].sum(), canvas[y1:y2].sum(), canvas[y2:].sum()]
    assert max(areas) - min(areas) <= 2 * widths.max()
    moved = np.roll(np.roll(canvas, dy, axis=0), dx, axis=1)
    assert zones.equal_area_zones(moved) == (y1 + dy, y2 + dy)


@settings(max_examples=25, deadline=None)
@given(k=st.integers(2, 4), h=st.integers(9, 40), w=st.integers(3, 30))
def test_equal_area_zones_scale_with_the_image(k, h, w):
    small = np.zeros((60, 40), bool)
    small[5:5 + h, 2:2 + w] = True
    small[5 + h // 2:5 + h, 2 + w:4 + w] = True
    big = np.kron(small, np.ones((k, k), bool))
    y1, y2 = zones.equal_area_zones(small)
    b1, b2 = zones.equal_area_zones(big)
    assert abs(b1 - k * y1) <= k and abs(b2 - k * y2) <= k


def test_grades():
    assert [zones.grade_from_percent(p) for p in (0, 0.4, 1, 33, 34, 66, 67, 100)] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_rotated_image_keeps_two_lungs_and_equal_zones():
    import cv2

    lung = two_lungs()
    opacity = np.zeros_like(lung)
    opacity[30:60, 20:85] = True
    rot = cv2.getRotationMatrix2D((100, 100), 12, 1.0)
    def turn(m):
        return cv2.warpAffine(m.astype(np.uint8), rot, (200, 200), flags=cv2.INTER_NEAREST) > 0
    rec = zones.score_masks(turn(lung), turn(opacity), 0.3)
    assert rec["lungs_found"] == 2 and rec["zones"]["A"]["affected"]
    assert not any(rec["zones"][z]["affected"] for z in "DEF")
    pair = zones.split_lungs(turn(lung))
    y1, y2 = zones.equal_area_zones(pair.right)
    areas = [pair.right[:y1].sum(), pair.right[y1:y2].sum(), pair.right[y2:].sum()]
    assert max(areas) - min(areas) <= 2 * pair.right.sum(axis=1).max()


def test_one_lung_over_the_centre_is_one_lung_and_merged_lungs_are_cut_at_their_waist():
    """A single lung pushed over the image centre (a shifted mediastinum, the other lung missed)
    has no waist: it is one lung, not two halves of it; two lungs joined by a bridge are cut
    there, and a speck beside them is no second lung."""
    one = np.zeros((256, 256), bool)
    yy, xx = np.mgrid[:256, :256]
    one[((yy - 128) / 90.0) ** 2 + ((xx - 95) / 52.0) ** 2 <= 1] = True  # columns 43-147
    pair = zones.split_lungs(one)
    assert pair.lungs_found == 1 and pair.right.sum() == one.sum() and not pair.left.any()
    merged = np.zeros((200, 200), bool)
    merged[30:170, 20:98] = True
    merged[40:160, 102:180] = True
    merged[60:70, 98:102] = True  # the bridge
    merged[80:100, 185:195] = True  # a speck beside them, at lung level
    pair = zones.split_lungs(merged)
    assert pair.lungs_found == 2
    assert pair.right[:, :98].sum() == merged[:, :98].sum() and not pair.right[:, 102:].any()
    assert pair.left[:, 102:180].sum() == merged[:, 102:180].sum() and not pair.left[:, 185:].any()


def test_a_lung_broken_in_two_keeps_both_parts_and_a_mark_above_it_is_dropped():
    """Stage I broke the patient's right lung at a consolidation: both parts are that lung and the
    opacity in the upper one scores zone A; a marker above the other lung is not lung."""
    lung = np.zeros((200, 200), bool)
    lung[30:80, 20:85] = True  # right lung, upper part
    lung[100:170, 20:85] = True  # right lung, lower part
    lung[30:170, 115:180] = True  # left lung, whole
    lung[5:20, 120:140] = True  # a side marker above the left lung
    pair = zones.split_lungs(lung)
    assert pair.lungs_found == 2
    assert pair.right.sum() == lung[30:170, 20:85].sum() and not pair.right[:, 100:].any()
    assert pair.left.sum() == lung[30:170, 115:180].sum()
    opacity = np.zeros_like(lung)
    opacity[30:80, 20:85] = True
    record = zones.score_masks(lung, opacity, 0.5)
    assert record["zones"]["A"]["affected"] and record["score"] == 1
    assert zones.clean_lungs(lung).sum() == pair.right.sum() + pair.left.sum()


def test_a_zone_is_affected_as_its_shown_fraction_says():
    """A fraction of 0.0999906 is shown (and read by calibration) as 0.1: at T = 0.1 the zone is
    affected, so the record never contradicts itself."""
    lung = np.zeros((400, 600), bool)
    lung[:, :267] = True  # patient's right lung: 106,800 pixels, zone A a third of it
    lung[:, 333:] = True
    right = zones.split_lungs(lung).right
    y_top, _ = zones.equal_area_zones(right)
    opacity = np.zeros_like(lung)
    zone_a = np.argwhere(right[:y_top])
    need = int(np.ceil(0.0999906 * len(zone_a)))
    opacity[tuple(zone_a[:need].T)] = True
    record = zones.score_masks(lung, opacity, 0.1)
    assert record["zones"]["A"]["opacity_fraction"] == 0.1 and 0.09999 < need / len(zone_a) < 0.1
    assert record["zones"]["A"]["affected"]
    from cxrtune.scoring.evaluation import max_zone_shares  # what calibration's FP count reads: the same 0.1

    assert max_zone_shares(lung, opacity.astype(np.float32), [0.5]).tolist() == [0.1]


def test_a_lung_with_a_dip_beside_the_other_lung_is_not_cut_and_two_humped_merged_lungs_are():
    """A lung over the centre whose column heights dip (a consolidation Stage I missed from below)
    stays one lung while the other lung stands beside it; two lungs merged over the mediastinum
    whose heights dip to 0.64 of their peaks (above half their median column) are cut there."""
    dipped = np.zeros((200, 200), bool)
    dipped[30:170, 30:110] = True
    dipped[60:170, 62:72] = False  # heights 30 against peaks of 140
    dipped[40:160, 130:180] = True  # the other lung
    pair = zones.split_lungs(dipped)
    assert pair.lungs_found == 2
    assert pair.right.sum() == dipped[:, :120].sum() and pair.left.sum() == dipped[:, 120:].sum()
    humps = np.zeros((200, 200), bool)
    for x in range(30, 170):  # column heights: two humps of 140 rows, 90 rows between them
        height = 90 + int(50 * abs(np.sin(np.pi * (x - 30) / 70)))
        humps[100 - height // 2:100 + (height + 1) // 2, x] = True
    heights = humps.sum(axis=0)[30:170]
    assert heights.min() / heights.max() < 0.75 and heights.min() > 0.5 * np.median(heights)
    pair = zones.split_lungs(humps)
    assert pair.lungs_found == 2 and abs(int(pair.right.sum()) - int(pair.left.sum())) < 0.1 * humps.sum()
