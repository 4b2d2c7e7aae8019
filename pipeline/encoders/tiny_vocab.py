"""A small, fixed WordPiece vocabulary for the UNTRAINED tiny-bert test encoder.

Every character has a piece (so nothing maps to [UNK] except non-ASCII), and a few
hundred whole words keep radiology sentences short. The order is fixed: ids never move.
"""
from __future__ import annotations

import json
import string

import xxhash

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

WORDS = """
a an the and or but not no nor with without of in on at to from by for as is are was were be been
being has have had this that these those there here it its which who than then also may can could
should would will new old now again still more less most least very mild mildly moderate moderately
severe severely small large larger smaller minimal minor trace tiny stable unchanged improved improving
worse worsening increased increase decreased decrease interval change changes since prior previous
compared comparison study exam examination image images view views frontal lateral pa ap portable
upright supine semi erect chest thorax thoracic lung lungs pulmonary lobe lobes upper middle lower left
right bilateral bilaterally both base bases apex apices hilar hila hilum perihilar mediastinum
mediastinal heart cardiac cardiomediastinal cardiomegaly silhouette contour contours size normal
abnormal enlarged enlargement top borderline within limits aorta aortic arch tortuous tortuosity
calcified calcification calcifications atherosclerotic vascular vasculature congestion edema
interstitial alveolar airspace opacity opacities opacification consolidation consolidations
atelectasis atelectatic collapse scarring fibrosis nodule nodules mass masses lesion lesions granuloma
effusion effusions pleural fluid thickening pneumothorax pneumothoraces pneumonia infection aspiration
infiltrate infiltrates hyperinflation hyperinflated emphysema copd diaphragm hemidiaphragm
hemidiaphragms costophrenic angle angles blunting sulcus spine thoracic osseous bony structures
fracture fractures rib ribs clavicle degenerative deformity soft tissue tissues subcutaneous air free
gas abdomen bowel tube tubes line lines catheter catheters picc port pacemaker leads lead wire wires
sternotomy clips surgical endotracheal enteric nasogastric tip terminates terminating projects
projecting overlying positioned position placement device devices valve svc cavoatrial junction
carina stomach focal diffuse patchy streaky linear hazy ill defined well clear clearing clearly
evidence suggest suggests suggestive consistent concerning concern likely unlikely possible possibly
probable probably represent represents representing could due related underlying superimposed
component vs versus differential include includes including seen noted identified demonstrated
visualized present absent acute chronic findings finding impression recommend recommended
follow up ct further evaluation clinical correlation patient history shortness breath cough fever
pain status post removal resolved resolution persistent persists residual remains remain
appear appears appearing unremarkable otherwise grossly essentially significant definite definitely
obvious apparent low volumes volume elevation elevated midline shift
cm mm one two three four five
""".split()


def tiny_vocab() -> dict[str, int]:
    chars = string.ascii_lowercase + string.digits + string.punctuation
    pieces = list(SPECIAL_TOKENS) + list(chars) + ["##" + c for c in chars]
    seen = set(pieces)
    for word in WORDS:
        if word not in seen:
            pieces.append(word)
            seen.add(word)
    return {piece: i for i, piece in enumerate(pieces)}


def tiny_vocab_hash() -> str:
    """Goes into tiny-bert's config, so editing the word list changes its fingerprint."""
    return xxhash.xxh3_128_hexdigest(json.dumps(tiny_vocab()).encode())


def tiny_tokenizer(max_tokens: int):
    """A deterministic BERT-style WordPiece tokenizer over ``tiny_vocab``, built in memory."""
    from tokenizers import (  # lazy: transformers takes seconds to import
        Tokenizer,
        decoders,
        normalizers,
        pre_tokenizers,
        processors,
    )  # lazy: transformers takes seconds to import
    from tokenizers.models import WordPiece  # lazy: transformers takes seconds to import
    from transformers import PreTrainedTokenizerFast  # lazy: transformers takes seconds to import

    vocab = tiny_vocab()
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=max_tokens,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )
