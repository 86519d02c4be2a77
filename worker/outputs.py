"""The outputs written from committed results while screening goes on: DICOM (``--dicom-out``, ``--send-to``:
``worker.dicom_out.BackgroundOutputs``) and FHIR (``--fhir-out``: ``worker.fhir_out.FhirOutputs``), told of each
commit as one. Each is only imported when asked for (highdicom and OpenCV load with the DICOM outputs)."""

from __future__ import annotations

from collections.abc import Sequence

from neuron.settings import Settings


class Outputs:
    """The output writers of one screening process; ``add`` after a commit never blocks, ``close`` writes what
    waits and stops them."""

    def __init__(self, writers: Sequence):
        self.writers = list(writers)

    def add(self, sop_uids: Sequence[str]) -> None:
        for writer in self.writers:
            writer.add(sop_uids)

    def close(self) -> None:
        """Close every writer, each even when one before it failed (the first error is raised after)."""
        error: BaseException | None = None
        for writer in self.writers:
            try:
                writer.close()
            except BaseException as exc:
                error = error or exc
        if error is not None:
            raise error


def open_outputs(settings: Settings, role: str, complete_only: bool = True,
                 flush_after_s: float | None = None) -> Outputs | None:
    """The writers the settings ask for, started (an unwritable folder stops here, before screening), or None.
    ``complete_only`` (``neuron run``): a study's SR and Bundle once none of its instances waits; otherwise each
    commit's studies as they stand. ``role`` names the process in the audit of the FHIR outputs."""
    writers = []
    try:
        if settings.dicom_out is not None:
            from worker.dicom_out import BackgroundOutputs

            writers.append(BackgroundOutputs(settings, complete_only=complete_only, flush_after_s=flush_after_s))
        if settings.fhir_out is not None:
            from worker.fhir_out import FhirOutputs

            writers.append(FhirOutputs(settings, role, complete_only=complete_only,
                                       flush_after_s=flush_after_s or 1.0))
    except BaseException:
        Outputs(writers).close()
        raise
    return Outputs(writers) if writers else None
