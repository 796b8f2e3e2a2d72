"""The mistakes a user can make: in params, data, paths or requests.

Stages and commands print these as one `error:` line, without a traceback, because the message
already says what is wrong and what to do. This module imports nothing heavy, so a stage that
needs no model (prepare) does not load torch just to know its error types.
"""


class UserError(ValueError):
    """Base of every error whose message is meant for the person running the pipeline."""


class ParamsError(UserError):
    """A params file or value that cannot be used; the message names the key."""


class DatasetError(UserError):
    """Raw data that cannot be read as the source's format; the message names the file."""


class TrainingError(UserError):
    """Training that cannot go on (a loss that is not finite); nothing is saved as the model."""


class ArtifactError(UserError):
    """Stage outputs that are damaged or do not fit together: `problem` names the files and what is
    wrong, `remedy` what to rerun. A reader that is not a stage (the gallery, which `dvc repro`
    cannot rebuild) keeps the problem and gives its own remedy."""

    def __init__(self, problem: str, remedy: str = "rerun the stage that writes it (dvc repro)"):
        super().__init__(problem, remedy)  # both in args, so the error pickles whole
        self.problem, self.remedy = problem, remedy

    def __str__(self) -> str:
        return f"{self.problem}; {self.remedy}"


class ModelError(UserError):
    """A model name, weight tag or checkpoint that cannot be used; the message says what to do."""


class IndexBuildError(UserError):
    """A factory string or search setting that cannot work; the message names the param."""


class GalleryError(UserError):
    """The gallery cannot be used as it is; the message says what to do."""


class PredictError(UserError):
    """A user request that cannot be answered; the message says why and what to do."""
