"""Synthetic bilateral hip MRI phantoms for four simulated hospitals, written as real DICOM.

The model is described in ``sim/phantoms/anatomy.py``; this package re-exports its public names.
"""

from sim.phantoms.anatomy import (
    FOV_CENTRE_LPS_MM,
    GENERATOR_VERSION,
    PROFILES,
    PhantomProfile,
    ScannerProfile,
    generate_phantoms,
    read_ground_truth,
)

__all__ = [
    "FOV_CENTRE_LPS_MM",
    "GENERATOR_VERSION",
    "PROFILES",
    "PhantomProfile",
    "ScannerProfile",
    "generate_phantoms",
    "read_ground_truth",
]
