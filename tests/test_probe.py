"""Hardware profiles: YAML round trip, validation, the rate curves, and a small real probe on this machine."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from fuyou_ray.probe import ProbeOptions, run_probe
from fuyou_ray.profile import (
    DEFAULT_MEMCPY_GBPS,
    AdamRate,
    BlockRate,
    CPUProfile,
    GPUProfile,
    HardwareProfile,
    PCIeProfile,
    ProfileError,
    SSDProfile,
    SSDRate,
    block_forward_gflop,
    fit_block_curve,
    load_profile,
    profile_from_dict,
)
from tests.conftest import REPO


def sample_profile() -> HardwareProfile:
    return HardwareProfile(
        name="sample",
        gpu=GPUProfile("gpu", "cuda", 24 << 30, 165.0, 150.0, 40.0, (BlockRate(5120, 1024, 140.0),)),
        pcie=PCIeProfile(25.0, 24.0, 46.0, 12.0),
        ssd=SSDProfile(
            devices=2,
            rates=(SSDRate(1, 1.0, 0.5), SSDRate(16, 4.0, 2.0)),
            mixed_read_gbps=1.5,
            mixed_write_gbps=0.8,
            capacity_bytes=10**12,
        ),
        cpu=CPUProfile("cpu", 16, 64 << 30, 32 << 30, (AdamRate(1, 0.5), AdamRate(8, 3.0)), 12.5),
        notes=("made up for a test",),
    )


def test_yaml_round_trip(tmp_path: Path) -> None:
    prof = sample_profile()
    path = tmp_path / "p.yaml"
    prof.save(path)
    assert load_profile(path) == prof


def test_the_repository_profiles_load() -> None:
    paths = sorted((REPO / "configs" / "profiles").glob("*.yaml"))
    assert paths, "configs/profiles/ holds no profile"
    for path in paths:
        prof = load_profile(path)
        assert prof.name and prof.notes, f"{path}: name and notes (where the figures come from) are required"


def test_unknown_key_and_bad_values_are_named() -> None:
    data = sample_profile().to_dict()
    data["gpu"]["tflops"] = 1.0
    with pytest.raises(ProfileError, match=r"gpu.*unknown key 'tflops'"):
        profile_from_dict(data)
    data = sample_profile().to_dict()
    data["ssd"]["rates"][0]["read_gbps"] = "fast"
    with pytest.raises(ProfileError, match=r"ssd\.rates\[0\]\.read_gbps"):
        profile_from_dict(data)
    data = sample_profile().to_dict()
    data["cpu"]["adam"] = []
    with pytest.raises(ProfileError, match=r"cpu\.adam"):
        profile_from_dict(data)


def test_a_profile_without_the_host_copy_rate_loads_with_the_default(tmp_path: Path) -> None:
    """Profiles written before cpu.memcpy_gbps existed (the recorded H100 box's among them) still load;
    the host cache's copies are then priced at the documented default."""
    data = sample_profile().to_dict()
    del data["cpu"]["memcpy_gbps"]
    old = profile_from_dict(data)
    assert old.cpu.memcpy_gbps == 0 and old.cpu.memcpy_bps() == DEFAULT_MEMCPY_GBPS * 1e9
    assert sample_profile().cpu.memcpy_bps() == 12.5e9
    recorded = load_profile(REPO / "configs" / "profiles" / "h100-box-recorded.yaml")
    assert recorded.cpu.memcpy_bps() > 0
    data["cpu"]["memcpy_gbps"] = -1.0
    with pytest.raises(ProfileError, match=r"cpu\.memcpy_gbps"):
        profile_from_dict(data)


def test_missing_profile_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="fuyou-ray probe"):
        load_profile(tmp_path / "nope.yaml")


def test_block_curve_fit_recovers_its_parameters() -> None:
    peak, half = 150.0, 40.0
    shapes = [(1024, 512), (2048, 1024), (5120, 1024), (5120, 8192), (12288, 4096)]
    points = []
    for h, t in shapes:
        work = block_forward_gflop(h, t)
        points.append(BlockRate(h, t, peak * work / (work + half)))
    got_peak, got_half = fit_block_curve(points)
    assert got_peak == pytest.approx(peak, rel=1e-6) and got_half == pytest.approx(half, rel=1e-6)
    gpu = GPUProfile(block_tflops=got_peak, half_work_gflop=got_half)
    assert gpu.block_rate(1e15) == pytest.approx(peak * 1e12, rel=1e-3)  # saturates


def test_ssd_rates_by_queue_depth_devices_and_mixing() -> None:
    ssd = sample_profile().ssd
    assert ssd.read_bps(1) == 1e9 and ssd.read_bps(16) == 4e9
    assert 1e9 < ssd.read_bps(4) < 4e9  # interpolated
    assert ssd.read_bps(64) == 4e9  # flat beyond the deepest measured
    double = ssd.with_devices(4)
    assert double.read_bps(16) == pytest.approx(8e9) and double.capacity_bytes == 2 * ssd.capacity_bytes
    capped = SSDProfile(devices=1, rates=(SSDRate(8, 3.0, 2.0),), max_gbps=5.0).with_devices(4)
    assert capped.read_bps(8) == 5e9 and capped.write_bps(8) == 5e9
    assert ssd.shared_bps(16, 3, 0) == (4e9, 0.0)
    r, w = ssd.shared_bps(16, 1, 1)  # the measured 1:1 mix at the deepest queue
    assert r == pytest.approx(1.5e9) and w == pytest.approx(0.8e9)
    plain = SSDProfile(rates=(SSDRate(8, 2.0, 1.0),))
    r, w = plain.shared_bps(8, 1, 1)  # time sharing: half the device each
    assert r == pytest.approx(1e9) and w == pytest.approx(0.5e9)


def test_steady_streams_cap_the_single_record_rates() -> None:
    """A disk whose cache serves single records faster than the streams of a step: the streams win."""
    burst = SSDProfile(rates=(SSDRate(1, 1.8, 2.2), SSDRate(16, 2.0, 2.4)), mixed_read_gbps=0.9)
    ssd = dataclasses.replace(burst, mixed_write_gbps=0.7, steady_read_gbps=1.9, steady_write_gbps=1.5)
    assert ssd.read_bps(1) == pytest.approx(1.8e9) and ssd.read_bps(16) == pytest.approx(1.9e9)
    assert ssd.write_bps(1) == ssd.write_bps(16) == pytest.approx(1.5e9)
    assert burst.write_bps(16) == pytest.approx(2.4e9)  # profiles without streams keep their rates
    r, w = ssd.shared_bps(16, 1, 1)  # the measured 1:1 mix is still what both at once get
    assert r == pytest.approx(0.9e9) and w == pytest.approx(0.7e9)
    two = ssd.with_devices(2)
    assert two.steady_write_gbps == pytest.approx(3.0) and two.write_bps(16) == pytest.approx(3.0e9)


def test_adam_rate_interpolates_by_threads() -> None:
    cpu = sample_profile().cpu
    assert cpu.adam_rate(1) == 0.5e9
    assert cpu.adam_rate(8) == 3e9
    assert 0.5e9 < cpu.adam_rate(4) < 3e9
    assert cpu.adam_rate(64) == 3e9


def test_pcie_both_directions_share_the_duplex_rate() -> None:
    pcie = sample_profile().pcie
    assert pcie.rates(True, False) == (25e9, 24e9)
    h, d = pcie.rates(True, True)
    assert h + d == pytest.approx(46e9) and h / d == pytest.approx(25 / 24)


def test_probe_on_this_machine(tmp_path: Path) -> None:
    """A probe with tiny sizes: every section measured, the SSD files removed, the YAML loads back."""
    ssd = tmp_path / "ssd"
    options = ProbeOptions(
        ssd_dirs=(str(ssd),),
        ssd_file_mib=4,
        queue_depths=(1, 4),
        device="cpu",
        copy_mib=8,
        adam_melements=1,
        block_shapes=((64, 128), (128, 256)),
        adam_threads=(1,),
        cache_mib=8,
        mixed_seconds=1.0,
    )
    ours = f"-{os.getpid()}-"  # ring and cache files are named after the creating process
    lines: list[str] = []
    prof = run_probe(options, log=lines.append)
    assert prof.gpu.device == "cpu" and prof.gpu.block_tflops > 0 and len(prof.gpu.points) == 2
    assert prof.pcie.h2d_gbps > 0 and any("host memcpy" in n for n in prof.notes)
    assert [r.queue_depth for r in prof.ssd.rates] == [1, 4]
    assert all(r.read_gbps > 0 and r.write_gbps > 0 for r in prof.ssd.rates)
    assert prof.ssd.mixed_read_gbps > 0 and prof.ssd.mixed_write_gbps > 0 and prof.ssd.capacity_bytes > 0
    assert prof.ssd.steady_read_gbps > 0 and prof.ssd.steady_write_gbps > 0
    assert prof.cpu.adam[0].threads == 1 and prof.cpu.adam[0].gparams_per_s > 0
    assert prof.cpu.memcpy_gbps > 0 and any(line.startswith("host cache copies") for line in lines)
    assert list(ssd.iterdir()) == [], "the probe must remove its files"
    left = [p.name for p in Path("/dev/shm").iterdir() if ours in p.name]
    assert left == [], f"the probe must remove its ring and cache files: {left}"
    path = tmp_path / "p.yaml"
    prof.save(path)
    assert load_profile(path) == prof
    assert any(line.startswith("ssd ") for line in lines)
