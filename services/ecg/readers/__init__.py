"""Readers: each turns one ECG file format into one ``Recording`` (``services.ecg.recording``).

``wfdb_record`` (WFDB records: .hea with .dat/.mat signal files), ``arrays`` (.npy, .npz), ``text`` (CSV,
JSON), ``edf`` (EDF/EDF+/BDF); ``archive`` holds the .zip safety checks the .npz reader and the uploads
share, ``units`` the voltage units of the non-WFDB formats. Every reader raises ``EcgInputError`` with a
message saying what is wrong and where (line and column of a CSV, the channel of an EDF, the member of a
zip), and, given ``ReadLimits``, admits the record before decoding its samples. Which reader an upload
goes to is decided above, in ``services.ecg.upload``.
"""

from services.ecg.readers.archive import extract_zip
from services.ecg.readers.arrays import read_npy, read_npz
from services.ecg.readers.edf import read_edf
from services.ecg.readers.text import read_csv, read_json
from services.ecg.readers.wfdb_record import read_wfdb

__all__ = ["extract_zip", "read_csv", "read_edf", "read_json", "read_npy", "read_npz", "read_wfdb"]
