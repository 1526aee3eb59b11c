"""main.log, llm.c's llmc/logger.h: one line per event (`s:%d trl:%f`, `s:%d tel:%f`), so that llm.c's
plotting code reads our logs and ours reads llm.c's. Does nothing without an output directory."""

import os


class Logger:
    def __init__(self, output_dir):
        self.path = None
        if output_dir:
            os.makedirs(output_dir, exist_ok=True)
            self.path = os.path.join(output_dir, "main.log")
            open(self.path, "w").close()

    def _write(self, line):
        if self.path:
            with open(self.path, "a") as f:
                f.write(line + "\n")

    def log_val(self, step, val_loss):
        self._write(f"s:{step} tel:{val_loss:f}")

    def log_train(self, step, train_loss):
        self._write(f"s:{step} trl:{train_loss:f}")
