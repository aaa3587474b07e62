"""Synthetic bilateral hip MRI phantoms for four simulated hospitals, written as real DICOM.

Clinical data is private, so the simulation harness trains and tests on phantoms. Each
phantom is one patient's T2-weighted turbo spin echo hip study, written as one uncompressed
MR DICOM series in the site folder layout of ``docs/CONVENTIONS.md``::

    <out_dir>/phantoms.json          summary: profile, seed, scanner traits, counts, measured CNR
    <out_dir>/ground_truth.csv       per head: centre, radius, sign location (never in a site folder)
    <out_dir>/<site>/manifest.csv    patient_id,study,side,ficat_stage,box_lps_mm,scanner
    <out_dir>/<site>/study-0042/DICOM/<random file names>   (+ junk files in some studies)

Coordinates
    Everything is physical LPS (+x patient left, +y posterior, +z superior), mm. The scanner's
    field of view (``ScannerProfile.fov_lps_mm``, extents along x, y, z) is centred on the LPS
    origin ``(0, 0, 0)``; along each axis it holds ``n = fov / spacing`` voxels (an integer,
    checked) whose centres sit at ``(i - (n - 1) / 2) * spacing``. Half the studies (at random,
    per study) are cut to a smaller field of view on the same voxel lattice, like a pelvic or
    prostate protocol that cuts through the hips: x near-symmetric (the outermost head centre
    at most a quarter radius outside, so a head's lateral part may be missing), anterior and
    posterior edges independently, and a slab 54 mm thick or more near the heads (the
    ProstateX T2 study marked in ``docs/landmarks`` is 57 mm thick with its head centres 4 and 8 mm inside
    its lateral edges). Axial series: rows run +y, columns +x,
    slices +z (``ImageOrientationPatient = 1\\0\\0\\0\\1\\0``, spacing x = y = pixel spacing,
    z = slice thickness). Coronal series: rows run -z (first row is the most superior), columns
    +x, slices +y (``1\\0\\0\\0\\0\\-1``, normal = row x column = +y; spacing x = column
    spacing, z = row spacing, y = slice thickness). Slices are contiguous
    (``SpacingBetweenSlices == SliceThickness``). Read with SimpleITK and reoriented with
    ``DICOMOrient(image, "LPS")`` the array is ``[z, y, x]`` with
    ``ScannerProfile.voxel_spacing_mm`` as its ``(D, H, W)`` spacing (``grid_shape`` voxels,
    fewer when cropped).

Modules
    ``profiles`` (scanner protocols and counts per center), ``geometry`` (signed distance
    shapes), ``anatomy`` (the patient model and the Ficat-Arlet signs), ``render`` (patient
    to voxels), ``scanner`` (bias field, noise, stored pixels, measured CNR),
    ``dicom_writer`` (one study as a DICOM series) and ``generate`` (the driver:
    ``generate_phantoms``). Their docstrings give the full model.

Profiles and cost
    ``"paper"``: the paper's counts (``sim.phantoms.profiles``) at full resolution (<= 1.4 M
    voxels per study, fewer when cropped); on 2 idle CPU cores generator version 6 took
    about 50 s (540 MB). Version 7 (surroundings, randomisation, crops) writes 373 MB;
    rendering and writing the same 24 studies (6 per scanner), versions interleaved on the
    same loaded machine, took 0.83 x version 6's time (cropped studies have fewer voxels;
    quick profile 0.82 x). ``"quick"``: the same four scanners at 3-3.6 mm x 6 mm voxels,
    10/6/4/4 heads from 6/4/3/2 patients, about 1-3 s and 5 MB.

Determinism
    Everything derives from ``seed`` through ``numpy.random.SeedSequence`` keyed by site and
    patient, and DICOM UIDs come from ``pydicom.uid.generate_uid`` with entropy from the same
    keys, so the same seed gives byte-identical files whatever the number of workers.
"""

from sim.phantoms.generate import GENERATOR_VERSION, generate_phantoms, read_ground_truth
from sim.phantoms.profiles import FOV_CENTRE_LPS_MM, PROFILES, PhantomProfile, ScannerProfile

__all__ = [
    "FOV_CENTRE_LPS_MM",
    "GENERATOR_VERSION",
    "PROFILES",
    "PhantomProfile",
    "ScannerProfile",
    "generate_phantoms",
    "read_ground_truth",
]
