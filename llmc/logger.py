"""main.log, llm.c's llmc/logger.h: one line per event, in its format and numbering, so llm.c's
plotting code reads our logs and ours reads llm.c's:

    s:<step> tel:<val loss, 4 decimals>                                 before the update of step
    s:<step> trl:<train loss, 4 decimals> lr:<6 decimals> norm:<2 decimals>  after it
    s:<step> eval:<HellaSwag acc_norm, 4 decimals>
    s:<step> gpu_util:<%> gpu_mem_used:<MiB> ...                       -lg's GPU readings (llmc/gpuinfo.py)

<step> is the training loop's 0-based index, as train_gpt2.cu writes it: "s:0 tel:" is the val loss
before any update and "s:0 trl:" the loss of the first update. Does nothing without an output dir.
A resumed run (-y 1) appends, as llm.c's logger_init with resume; otherwise the file starts empty.
"""

import os


class Logger:
    def __init__(self, output_dir, append=False):
        self.path = None
        if output_dir:
            os.makedirs(output_dir, exist_ok=True)
            self.path = os.path.join(output_dir, "main.log")
            if not append:
                open(self.path, "w").close()

    def _write(self, line):
        if self.path:
            with open(self.path, "a") as f:
                f.write(line + "\n")

    def log_val(self, step, val_loss):
        self._write(f"s:{step} tel:{val_loss:.4f}")

    def log_train(self, step, train_loss, learning_rate, grad_norm):
        self._write(f"s:{step} trl:{train_loss:.4f} lr:{learning_rate:.6f} norm:{grad_norm:.2f}")

    def log_eval(self, step, accuracy):
        self._write(f"s:{step} eval:{accuracy:.4f}")

    def log_fields(self, step, fields):
        """A line besides llm.c's three: "key:number ..." pairs, which plotting code reads as more streams."""
        self._write(f"s:{step} {fields}")
