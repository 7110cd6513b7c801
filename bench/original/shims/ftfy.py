"""Stand-in for ftfy: only ImageBind's text tokenizer calls fix_text, and training never tokenizes
text for ImageBind. Identity, so an accidental call stays harmless."""


def fix_text(text, *args, **kwargs):
    return text
