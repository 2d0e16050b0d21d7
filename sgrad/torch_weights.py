"""Read a PyTorch state dict (``.pth``) with NumPy alone: no torch at run time.

A ``torch.save`` file is pickles plus raw tensor storages. Two layouts exist: since
PyTorch 1.6 a zip archive (``*/data.pkl`` and one file per storage under ``*/data/``),
before it the "legacy" stream (magic number, protocol, system info, the state-dict
pickle, the list of storage keys, then each storage as an int64 element count and its
bytes). Both pickles name a few torch callables; :class:`StateDictUnpickler` resolves
exactly those to NumPy stand-ins and refuses every other global, so a file cannot run
code while it is read (what ``pickle.load`` alone would allow).
"""
import collections
import pickle
import struct
import zipfile

import numpy as np

from sgrad.errors import InputError

#: torch storage classes -> NumPy dtypes (little-endian, as torch writes them)
STORAGE_DTYPES = {'FloatStorage': '<f4', 'DoubleStorage': '<f8', 'HalfStorage': '<f2', 'LongStorage': '<i8',
                  'IntStorage': '<i4', 'ShortStorage': '<i2', 'CharStorage': 'i1', 'ByteStorage': 'u1',
                  'BoolStorage': '?'}
LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


class Storage:
    """A torch storage: its key in the file, its dtype, and (once read) its elements."""

    def __init__(self, key, dtype):
        self.key, self.dtype, self.array = key, np.dtype(dtype), None


class TensorView:
    """What ``torch._utils._rebuild_tensor_v2`` describes: a strided view of a storage."""

    def __init__(self, storage, offset, size, stride, *unused):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def to_numpy(self):
        itemsize = self.storage.dtype.itemsize
        flat = self.storage.array[self.offset:]
        return np.lib.stride_tricks.as_strided(flat, self.size, [s * itemsize for s in self.stride]).copy()


class StorageType:
    def __init__(self, name):
        self.dtype = STORAGE_DTYPES[name]


class StateDictUnpickler(pickle.Unpickler):
    """Unpickles a torch state dict into TensorViews; any global but the allowed few is an error."""

    def __init__(self, file):
        super().__init__(file)
        self.storages = {}

    def find_class(self, module, name):
        if (module, name) == ('collections', 'OrderedDict'):
            return collections.OrderedDict
        if (module, name) == ('torch._utils', '_rebuild_tensor_v2'):
            return TensorView
        if module == 'torch' and name in STORAGE_DTYPES:
            return StorageType(name)
        raise pickle.UnpicklingError('refusing %s.%s: not part of a plain state dict' % (module, name))

    def persistent_load(self, pid):
        kind, storage_type, key = pid[:3]
        if kind != 'storage':
            raise pickle.UnpicklingError('unknown persistent id %r' % (kind,))
        if key not in self.storages:
            self.storages[key] = Storage(key, storage_type.dtype)
        return self.storages[key]


def _read_zip(path):
    with zipfile.ZipFile(path) as archive:
        pickle_name, = [n for n in archive.namelist() if n.endswith('/data.pkl')]
        root = pickle_name[:-len('data.pkl')]
        with archive.open(pickle_name) as f:
            unpickler = StateDictUnpickler(f)
            state = unpickler.load()
        for key, storage in unpickler.storages.items():
            storage.array = np.frombuffer(archive.read(root + 'data/' + key), dtype=storage.dtype)
    return state


def _read_legacy(path):
    with open(path, 'rb') as f:
        if pickle.load(f) != LEGACY_MAGIC:
            raise pickle.UnpicklingError('not a torch.save file')
        pickle.load(f)  # protocol version
        pickle.load(f)  # system info: endianness and type sizes
        unpickler = StateDictUnpickler(f)
        state = unpickler.load()
        for key in pickle.load(f):
            storage = unpickler.storages[key]
            count, = struct.unpack('<q', f.read(8))
            storage.array = np.frombuffer(f.read(count * storage.dtype.itemsize), dtype=storage.dtype)
    return state


def load_state_dict(path):
    """{name: NumPy array} of a state dict saved with ``torch.save`` (either layout)."""
    try:
        state = (_read_zip if zipfile.is_zipfile(path) else _read_legacy)(path)
    except (OSError, EOFError, ValueError, KeyError, pickle.UnpicklingError, struct.error) as e:
        raise InputError('cannot read %s as a PyTorch state dict (%s)' % (path, e))
    return {name: value.to_numpy() if isinstance(value, TensorView) else np.asarray(value)
            for name, value in state.items()}
