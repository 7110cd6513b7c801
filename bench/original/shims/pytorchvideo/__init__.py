"""Stand-in for the pytorchvideo pieces ImageBind's data.py imports, written on torch and decord:
ShortSideScale, UniformTemporalSubsample, ConstantClipsPerVideoSampler, EncodedVideo (decord
decoder only). The original decodes with them the first time it meets a video or audio file
(it caches the embedding afterwards)."""
