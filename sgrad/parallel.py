"""Past one process: ChainerMN under ``mpiexec`` (MPICH's from PyPI lands in the venv's bin/).

Every script runs unchanged as one process; started by ``mpiexec -n K`` it splits its work over
the K ranks. Nothing here imports NumPy at module level: ``share_cores`` must run before it loads.
"""
import io
import os

from sgrad.errors import InputError

#: How MPI launchers tell a process its rank, the number of ranks, and the ranks on its own machine
#: (MPICH's hydra first, then Open MPI's).
RANK_VARS = ('PMI_RANK', 'OMPI_COMM_WORLD_RANK')
SIZE_VARS = ('PMI_SIZE', 'OMPI_COMM_WORLD_SIZE')
LOCAL_SIZE_VARS = ('MPI_LOCALNRANKS', 'OMPI_COMM_WORLD_LOCAL_SIZE')
#: Thread counts that a user may set; OpenBLAS, MKL and OpenMP all read OMP_NUM_THREADS.
THREAD_VARS = ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS')


def launcher_value(names, default):
    """The first of the environment variables ``names`` that the launcher set, as an int."""
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return default


def launched_ranks():
    """How many processes mpiexec started (1 without mpiexec)."""
    return launcher_value(SIZE_VARS, 1)


def is_first_rank():
    """True on rank 0, or without mpiexec, from the launcher's environment: the process that prints
    errors met before (or instead of) a communicator."""
    return launcher_value(RANK_VARS, 0) == 0


def is_root(comm):
    """True on the rank that prints, plots and writes (rank 0), or for one plain process (comm None)."""
    return comm is None or comm.rank == 0


def share_cores():
    """Under mpiexec, give each rank (cores / ranks on this machine) BLAS threads, so that K ranks
    do not run K x cores threads; a thread count set by the user (OMP_NUM_THREADS and the like)
    wins. Call before NumPy is imported: BLAS reads the variable when it loads."""
    local_ranks = launcher_value(LOCAL_SIZE_VARS, launched_ranks())
    if local_ranks > 1 and not any(name in os.environ for name in THREAD_VARS):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
        os.environ['OMP_NUM_THREADS'] = str(max(1, cores // local_ranks))


def create_communicator(name):
    """A ChainerMN communicator, or None for one plain process.

    ``name`` None means 'naive' when mpiexec started more than one process (the communicator for
    CPUs), else no communicator at all. Raises InputError (one line) for an unknown name, a
    communicator this machine cannot run (the NCCL ones need GPUs), or a missing MPI runtime.
    """
    if name is None:
        if launched_ranks() == 1:
            return None
        name = 'naive'
    import chainermn
    try:
        comm = chainermn.create_communicator(name)
    except ValueError as e:  # chainermn's message for an unknown name
        raise InputError('%s; CPU training uses --communicator naive' % e)
    except ImportError as e:
        raise InputError('ChainerMN needs mpi4py and an MPI runtime (%s); pip install mpi4py mpich'
                         % str(e).split(':')[0])
    except RuntimeError as e:  # no libmpi (mpi4py), or no CUDA/NCCL for that communicator
        reason = ' '.join(str(e).split())
        if 'MPI' in reason:
            raise InputError('ChainerMN needs an MPI runtime: %s (pip install mpich)' % reason)
        raise InputError('communicator %r cannot run here: %s; on CPUs use --communicator naive'
                         % (name, reason))
    if comm.size > 1:
        # an uncaught exception on one rank aborts them all, instead of leaving the others waiting
        chainermn.global_except_hook.add_hook()
    return comm


def split(items, comm):
    """This rank's share of ``items``: every comm.size-th item from position comm.rank (the
    ranks' shares interleave; ``gather_rows`` puts them back in order)."""
    return items if comm is None else items[comm.rank::comm.size]


def gather_rows(arrays, comm):
    """On rank 0, ``arrays`` ({key: NumPy array whose rows are this rank's share of the items
    (from ``split``), or None}) with every rank's rows back in the items' order; elsewhere None."""
    if comm is None:
        return arrays
    import numpy as np
    shares = comm.gather_obj(arrays)
    if comm.rank != 0:
        return None
    merged = {}
    for key, value in arrays.items():
        parts = [share[key] for share in shares]
        if value is None:
            merged[key] = None
            continue
        merged[key] = np.empty((sum(map(len, parts)),) + value.shape[1:], value.dtype)
        for rank, part in enumerate(parts):
            merged[key][rank::comm.size] = part
    return merged


def broadcast(value, comm):
    """Rank 0's ``value`` (not None) on every rank, whatever the others pass; ``value`` itself in one
    process."""
    return value if comm is None else comm.bcast_obj(value if comm.rank == 0 else None)


def broadcast_file(path, comm):
    """The bytes of the file ``path`` names on rank 0 (None there: None everywhere), sent to every
    rank, so that ranks on other machines need no shared file system."""
    data = None
    if is_root(comm):
        data = b''  # for no file: chainermn sends no None
        if path is not None:
            with open(path, 'rb') as f:
                data = f.read()
    if comm is not None:
        data = comm.bcast_obj(data)
    return io.BytesIO(data) if data else None
