"""Packages t5beam's model/, pipeline/ and launch/ (Dataflow installs workers
from this file with --setup_file).

Your own task module travels the same way: put it in a package beside
launch/ (a directory with an __init__.py, e.g. my_tasks/) and name it in
MIXTURE_OR_TASK_MODULE ('my_tasks'); every package here but tests/ and
bench/ is included.
"""

import setuptools

setuptools.setup(
    name='t5beam',
    version='0.1.0',
    description='Batch inference of T5-family JAX/Flax models over SeqIO '
                'tasks as an Apache Beam pipeline',
    packages=setuptools.find_packages(
        exclude=('tests', 'tests.*', 'bench', 'bench.*')),
    package_data={
        'launch': ['configs/*/*.gin'],
        'launch.demo': ['data/*.tsv', 'checkpoint/*', 'checkpoint/*/*',
                        'checkpoint/*/*/*'],
    },
    entry_points={
        'console_scripts': ['t5beam-infer = launch.infer:command'],
    },
    python_requires='>=3.10',
    install_requires=[
        'apache-beam[gcp]==2.77.0',
        'jax==0.10.2',
        'flax==0.12.8',
        'seqio==0.0.20',
        'orbax-checkpoint==0.12.8',
        'gcsfs==2026.10.1',
        'tensorflow==2.21.0',
        'gin-config==0.5.0',
        'sentencepiece==0.2.1',
        'protobuf==6.33.6',
        'numpy==2.4.6',
        'ml_dtypes==0.6.0',
        'fsspec==2026.9.0',
    ],
)
