"""Names of the records a training run keeps per unit, one record per stored tensor."""

from __future__ import annotations

import enum


class RecordKind(str, enum.Enum):
    """What a unit's record holds. PARAM is in the compute dtype; the rest are fp32."""

    PARAM = "param"  # weights in the compute dtype, read by forward and backward
    MASTER = "master"  # fp32 master weights
    EXP_AVG = "exp_avg"  # Adam first moment
    EXP_AVG_SQ = "exp_avg_sq"  # Adam second moment
    GRAD = "grad"  # the step's fp32 gradient (transient: logged for exact clipping)


def record_name(unit: int, kind: RecordKind) -> str:
    return f"u{unit:05d}.{kind.value}"


OPTIMIZER_STATE = (RecordKind.MASTER, RecordKind.EXP_AVG, RecordKind.EXP_AVG_SQ)
