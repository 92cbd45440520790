"""DINO's collapse watch (DINO paper, section 5.3 and fig. 7): without centring the teacher's
output collapses onto one dimension (the entropy of the batch-mean output falls to 0), without
sharpening to the uniform distribution (every output's entropy reaches log(out_dim), and the
student, matching it, leaves no KL to the teacher). EntropyWatch judges the step's
`teacher_entropy`, `batch_entropy` and `kl` (dino/loss.py) against those ends; the levels and
the runs that set them are in docs/dino.md (the collapse watch). It has LearningWatch's and
StdWatch's interface (common/watch/collapse.py), so PretrainRun feeds it the same way: the
progress lines' warning, metrics.jsonl's not_learning and --stop-if-not-learning."""
import math
from typing import Optional

UNIFORM_SHARE = 0.99  # a teacher entropy above this share of log(out_dim) is called uniform...
UNIFORM_KL = 0.05  # ...when the student also sits within this KL (nats) of it
ONE_DIM_SHARE = 0.15  # a batch-mean entropy below this share of log(out_dim) is called one dimension


class EntropyWatch:
    stats = ("teacher_entropy", "batch_entropy", "kl")

    def __init__(self, out_dim: int, hint: str):
        self.log_k, self.hint = math.log(out_dim), hint
        self.stuck_epochs = 0
        self.told = False  # the progress lines warn once per collapse, not every line

    def message(self, teacher_entropy: float, batch_entropy: float, kl: float) -> Optional[str]:
        """The sentence for a collapsed output; None for a healthy one."""
        if teacher_entropy >= UNIFORM_SHARE * self.log_k and kl < UNIFORM_KL:
            return (f"the teacher's entropy is {teacher_entropy:.3f} against log(out_dim) {self.log_k:.3f} and the "
                    f"student's KL to it {kl:.4f}: the output collapsed to the uniform distribution and the "
                    f"features stop improving; try {self.hint}")
        if batch_entropy < ONE_DIM_SHARE * self.log_k:
            return (f"the entropy of the teacher's batch-mean output is {batch_entropy:.3f} (log(out_dim) "
                    f"{self.log_k:.3f}): every image lands on the same dimension, the output collapsed and the "
                    f"features stop improving; try {self.hint}")
        return None

    def step(self, *values: float) -> Optional[str]:
        """A progress line's values: a sentence when the output collapsed (once, until it recovers)."""
        message = self.message(*values)
        told, self.told = self.told, message is not None
        return None if told else message

    def update(self, epoch: int, *values: float) -> Optional[str]:
        """The epoch's sentence, judged on its averages over all ranks."""
        message = self.message(*values)
        self.stuck_epochs = self.stuck_epochs + 1 if message else 0
        return message
