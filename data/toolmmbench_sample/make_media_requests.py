"""Writes data/toolmmbench_sample/media_requests.json from the bundled media (paths relative to data/)."""
import json
from pathlib import Path
data = Path(__file__).resolve().parents[1]  # the project's data/ folder
images = sorted(p.relative_to(data).as_posix() for p in (data/"t2x_pairs/cc3m/images").glob("*.jpg")) + ["assets/bird_image.jpg"]
audios = sorted(p.relative_to(data).as_posix() for p in (data/"t2x_pairs/audiocap/audios").glob("*.wav")) + ["assets/bird_audio.wav", "assets/test.wav"]
videos = sorted(p.relative_to(data).as_posix() for p in (data/"t2x_pairs/webvid/videos").glob("*.mp4")) + ["assets/test.mp4"]
# (query, tool) per modality; the last query of each list is the same text for all three
# modalities, so only the media tells which tool fits.
generic = "Which model should handle this file?"
plan = {
    "image": (images, [("Write a short caption for this photo.", "Salesforce/blip-image-captioning-large"),
                       ("Find the objects in this picture and draw boxes around them.", "facebook/detr-resnet-50"),
                       (generic, "nlpconnect/vit-gpt2-image-captioning")]),
    "audio": (audios, [("What sound events can be heard in this recording?", "MIT/ast-finetuned-audioset-10-10-0.4593"),
                       ("Please transcribe any speech in this clip.", "openai/whisper-large-v2"),
                       (generic, "laion/clap-htsat-unfused")]),
    "video": (videos, [("What action is happening in this video?", "MCG-NJU/videomae-base-finetuned-kinetics"),
                       ("Write a caption describing this video clip.", "Neleac/timesformer-gpt2-video-captioning"),
                       (generic, "microsoft/xclip-base-patch32")]),
}
rows = []
for modality, (files, queries) in plan.items():
    for path in files:
        for query, tool in queries:
            rows.append({"id": len(rows) + 1, "image_path": path if modality == "image" else "",
                         "video_path": path if modality == "video" else "", "audio_path": path if modality == "audio" else "",
                         "input_modality": modality, "output_modality": "text",
                         "conversations": [{"from": "human", "value": query, "input_modality": modality},
                                           {"from": "gpt", "value": tool, "ambiguity": -1, "output_modality": "text"}]})
Path(__file__).with_name("media_requests.json").write_text(json.dumps(rows, indent=1) + "\n")
print(len(rows))
