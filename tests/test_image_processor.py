"""Repair oracles: degrade a clean face in a known way, repair it, and check it passes and is closer
to the clean original than the degraded image was. Plus colour, dtype and shape preservation."""

import cv2
import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from agepipe.config.data_stages import Defects
from agepipe.config.schema import PoseJitter
from agepipe.quality.image_metrics import measure_array
from conftest import PROJECT
from image_processor import adjust_exposure, denoise, enhance_texture, resize_square, sharpen, stretch_contrast
from image_reader import failing_checks, load_explore_config
from make_sample_dataset import draw_face, plant_defect
from process_images import Processor, load_process_config

CONFIG, EXPLORE = load_process_config(
    PROJECT / "configs/process_images.yaml", explore=load_explore_config(PROJECT / "configs/explore_images.yaml")
)
SAMPLE = {
    "skin_tones": [[236, 200, 178], [150, 102, 76], [232, 196, 160]],
    "hair": [[90, 60, 35], [20, 20, 22], [160, 120, 70]],
}
POSE = PoseJitter(max_rotation_degrees=5, max_scale_change=0.05, max_shift_fraction=0.03)
# One strength per defect, from inside the generator's planted ranges.
DEFECTS = {
    "blur": ("blurry", Defects.model_construct(blur_sigma=[3.0, 3.0])),
    "noise": ("noisy", Defects.model_construct(noise_sigma=[22, 22])),
    "dark": ("dark", Defects.model_construct(dark_gain=[0.25, 0.25])),
    "bright": ("bright", Defects.model_construct(bright_headroom=[0.15, 0.15])),
    "low_contrast": ("low_contrast", Defects.model_construct(low_contrast_scale=[0.12, 0.12])),
}


def clean_faces():
    rng = np.random.default_rng(11)
    return [
        draw_face(rng, age, female, skin, hair, 200, POSE)
        for age, female, skin, hair in zip((8, 34, 67), (True, False, True), SAMPLE["skin_tones"], SAMPLE["hair"])
    ]


def similarity(reference, image):
    return (peak_signal_noise_ratio(reference, image), structural_similarity(reference, image, channel_axis=2))


@pytest.mark.parametrize("defect", list(DEFECTS))
def test_repair_passes_the_failed_check_and_moves_toward_the_original(defect, tmp_path):
    check, strength = DEFECTS[defect]
    processor = Processor(CONFIG, EXPLORE)
    for index, clean in enumerate(clean_faces()):
        degraded = plant_defect(clean, defect, np.random.default_rng(index), strength)
        before = measure_array(degraded, processor.settings)
        failed = failing_checks(before, processor.checks)
        assert check in failed, f"{defect} was not planted strongly enough: {before}"
        row = {"failed_checks": ";".join(failed), "noise": before["noise"]}
        result = processor.repair(row, degraded, tmp_path / f"{defect}{index}.png")
        assert result["status"] == "repaired", result
        repaired = cv2.imread(str(tmp_path / f"{defect}{index}.png"))
        assert check not in failing_checks(measure_array(repaired, processor.settings), processor.checks)
        psnr_before, ssim_before = similarity(clean, degraded)
        psnr_after, ssim_after = similarity(clean, repaired)
        print(
            f"{defect:13s} face {index}: PSNR {psnr_before:5.1f} -> {psnr_after:5.1f} dB, SSIM {ssim_before:.3f} -> "
            f"{ssim_after:.3f}  ({result['operations']})"
        )
        assert psnr_after > psnr_before or ssim_after > ssim_before + 0.01


def test_exposure_keeps_hue_and_hits_the_target():
    face = clean_faces()[1]
    dark = plant_defect(face, "dark", np.random.default_rng(0), Defects.model_construct(dark_gain=[0.3, 0.3]))
    brightened = adjust_exposure(dark, 120)
    assert cv2.cvtColor(brightened, cv2.COLOR_BGR2GRAY).mean() == pytest.approx(120, abs=2)
    hsv_before, hsv_after = (cv2.cvtColor(i, cv2.COLOR_BGR2HSV_FULL).astype(int) for i in (dark, brightened))
    coloured = (hsv_before[..., 1] > 60) & (hsv_before[..., 2] > 20) & (hsv_after[..., 2] < 250)
    hue_shift = np.abs((hsv_after[..., 0] - hsv_before[..., 0] + 128) % 256 - 128)[coloured]
    assert np.median(hue_shift) <= 2 and np.percentile(hue_shift, 95) <= 6


def test_exposure_keeps_the_colour_differences_instead_of_multiplying_them():
    """Multiplying a dark face's channels to brighten it multiplies its colour (a saturated cast) and
    its colour noise; shifting them keeps each pixel's differences between channels."""
    dark = plant_defect(
        clean_faces()[1], "dark", np.random.default_rng(0), Defects.model_construct(dark_gain=[0.3, 0.3])
    )
    brightened = adjust_exposure(dark, 120)
    unclipped = (brightened.max(axis=2) < 255) & (brightened.min(axis=2) > 0)
    chroma = lambda image: image.astype(int) - image.astype(int).mean(axis=2, keepdims=True)  # noqa: E731
    assert np.percentile(np.abs(chroma(brightened) - chroma(dark))[unclipped], 95) <= 2


def test_lightness_operations_keep_colour():
    face = clean_faces()[0]
    for result in (stretch_contrast(face, 60), enhance_texture(face, 2.0, 4), sharpen(face, 1.5, 1.5)):
        lab_before, lab_after = (cv2.cvtColor(i, cv2.COLOR_BGR2Lab).astype(int) for i in (face, result))
        assert np.abs(lab_after[..., 1:] - lab_before[..., 1:]).mean() < 2.0  # a*, b* barely move


@pytest.mark.parametrize("dtype, scale", [(np.uint8, 255), (np.uint16, 65535), (np.float32, 1.0)])
@pytest.mark.parametrize("gray", [False, True])
def test_every_operation_keeps_shape_dtype_and_range(dtype, scale, gray):
    face = clean_faces()[2]
    image = cv2.cvtColor(face, cv2.COLOR_BGR2GRAY) if gray else face
    image = (image.astype(np.float64) / 255 * scale).astype(dtype)
    original = image.copy()
    operations = [
        lambda i: denoise(i, noise_sigma=5, strength=1.0, template_window=7, search_window=21),
        lambda i: adjust_exposure(i, 150),
        lambda i: stretch_contrast(i, 60),
        lambda i: enhance_texture(i, 2.0, 4),
        lambda i: sharpen(i, 1.5, 1.0),
    ]
    for operation in operations:
        result = operation(image)
        assert result.shape == image.shape and result.dtype == image.dtype
        assert result.min() >= 0 and result.max() <= scale
        assert not np.array_equal(result, image)
    assert np.array_equal(image, original)  # inputs are never modified in place
    assert resize_square(image, 64).shape[:2] == (64, 64) and resize_square(image, 64).dtype == image.dtype


def test_resize_square_crops_the_centre():
    wide = np.zeros((100, 300, 3), np.uint8)
    wide[:, 100:200] = 255  # a white centre third
    assert resize_square(wide, 50).mean() == pytest.approx(255, abs=1)


def test_bad_arrays_are_refused_with_a_message():
    with pytest.raises(ValueError, match="expected dtype uint8, uint16 or float32"):
        sharpen(np.zeros((10, 10, 3), np.int32), 1, 1)
    with pytest.raises(ValueError, match="grayscale or .H, W, 3. BGR"):
        sharpen(np.zeros((10, 10, 4), np.uint8), 1, 1)
