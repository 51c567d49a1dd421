"""The one exception type that reaches the user as a message instead of a traceback."""


class UserError(Exception):
    """A problem the user can fix (bad recipe, missing file, incompatible combination).

    Entry points print its message, exit with status 2 and show no traceback.
    """

    exit_code = 2


class NodeFault(UserError):
    """A node that cannot run its share as Slurm allocated it (GPUs missing or unseen by CUDA): the node's
    fault, not the recipe's, so a Slurm job retries without it (launcher.cluster.retry), which exit
    status 2 would forbid."""

    exit_code = 3
