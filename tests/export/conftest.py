"""Shared fixtures of the export tests: small random SD1/SD2 and SDXL base / refiner diffusers folders, their
fp32 ONNX exports (once per session), and the sizes used."""

import pytest

from export.specs import ImageShape, ShapeProfile
from tests.model_factory import save_diffusers_folder

# Traced at one size, checked at another batch, size and aspect: proves the axes are dynamic.
SMALL_PROFILE = ShapeProfile(ImageShape(1, 32, 32), ImageShape(1, 64, 64), ImageShape(4, 128, 128))
CHECK_SHAPE = ImageShape(2, 48, 80)


@pytest.fixture(scope="session")
def model_folder(tmp_path_factory):
    """kind -> a diffusers folder of that kind, written once per session."""
    cache = {}

    def get(kind: str):
        if kind not in cache:
            cache[kind] = save_diffusers_folder(tmp_path_factory.mktemp(f"{kind}-model"), kind)
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def onnx_export(model_folder, tmp_path_factory):
    """kind -> an export directory holding that kind's four fp32 graphs (exported once per session)."""
    cache = {}

    def get(kind: str):
        if kind not in cache:
            cache[kind] = _exported(model_folder(kind), tmp_path_factory.mktemp(f"{kind}-onnx"))
        return cache[kind]

    return get


def _exported(folder, out):
    """`folder`'s fp32 graphs exported into `out` at SMALL_PROFILE."""
    from export.onnx import ensure_onnx

    ensure_onnx(out, folder, profile=SMALL_PROFILE, progress=False)
    return out


def _sdxl(tmp_path_factory, kind: str, seed: int):
    from tests.sdxl_factory import save_sdxl_folder

    role = "base" if kind == "sdxl" else "refiner"
    return save_sdxl_folder(tmp_path_factory.mktemp("sdxl") / role, kind, seed=seed)


@pytest.fixture(scope="session")
def sdxl_folder(tmp_path_factory):
    return _sdxl(tmp_path_factory, "sdxl", seed=0)


@pytest.fixture(scope="session")
def sdxl_export(sdxl_folder, tmp_path_factory):
    """The SDXL base's five fp32 graphs."""
    return _exported(sdxl_folder, tmp_path_factory.mktemp("sdxl-onnx"))


@pytest.fixture(scope="session")
def refiner_folder(tmp_path_factory):
    return _sdxl(tmp_path_factory, "sdxl-refiner", seed=1)


@pytest.fixture(scope="session")
def refiner_export(refiner_folder, tmp_path_factory):
    """The SDXL refiner's four fp32 graphs (text encoder 2, UNet, VAE decoder and encoder)."""
    return _exported(refiner_folder, tmp_path_factory.mktemp("refiner-onnx"))
