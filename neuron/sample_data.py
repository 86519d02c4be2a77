"""Real sample DICOMs for the quick start, from packages installed with Neuron (no download).

pydicom-data ships CR chest and extremity radiographs (RG1, RG3), MR and ultrasound from the DICOM compression test
set; pydicom ships its own small test files. File names are copied as they are: they are test-set names, not
patient data.
"""

from __future__ import annotations

import shutil
from pathlib import Path

# Chosen to show every path: chest CR in three transfer syntaxes (screened; the copies are duplicates by SOP UID),
# a non-chest CR (skipped: body part), MR/US/CT (skipped until their models exist), not-DICOM and a truncated file.
PYDICOM_DATA_FILES = ["RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm", "RG3_UNCR.dcm", "MR2_J2KR.dcm", "US1_J2KR.dcm",
                      "JPGLosslessP14SV1_1s_1f_8b.dcm", "693_J2KR.dcm"]
PYDICOM_FILES = ["CT_small.dcm", "MR_small_RLE.dcm", "rtplan.dcm", "MR_truncated.dcm", "README.txt"]


def pydicom_data_dir() -> Path:
    try:
        import data_store  # the import name of the pydicom-data package
    except ImportError as exc:
        raise FileNotFoundError("pydicom-data is not installed: pip install pydicom-data") from exc
    return Path(data_store.__file__).parent / "data"


def pydicom_test_dir() -> Path:
    import pydicom.data

    return Path(pydicom.data.__file__).parent / "test_files"


def copy_samples(dest: Path) -> int:
    dest.mkdir(parents=True, exist_ok=True)
    n = 0
    for folder, names in ((pydicom_data_dir(), PYDICOM_DATA_FILES), (pydicom_test_dir(), PYDICOM_FILES)):
        for name in names:
            src = folder / name
            if src.is_file():
                shutil.copy2(src, dest / name)
                n += 1
    return n
