"""Floor 2: text sources (Hub, local files, the embedded corpus), chat rendering and packing into blocks."""

from .chat import row_text
from .mixture import domain_name, mix_blocks, parse_weights, split_sources
from .packing import pack_blocks, tokenize_documents
from .sources import EMBEDDED_DATASET, embedded_corpus, load_split, load_text_dataset, read_documents, select_split

__all__ = ["row_text", "domain_name", "mix_blocks", "parse_weights", "split_sources", "pack_blocks", "tokenize_documents", "EMBEDDED_DATASET", "embedded_corpus", "load_split",
           "load_text_dataset", "read_documents", "select_split"]
