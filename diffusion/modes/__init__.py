"""The file-writing runners of launch.py's modes: sample, evaluate, pictures (training is
diffusion.train). Each takes the config and a workdir; the library below takes typed values."""
