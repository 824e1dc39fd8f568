import gzip
from collections import Counter

import pyarrow.parquet as pq
import pytest

from keplm.kg.reader import read_aliases, read_entities, write_entities
from keplm.platform.errors import KeplmError


def write(path, text, gz=False):
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")


def test_ids_in_file_order_duplicates_keep_first_type(tmp_path):
    write(tmp_path / "entities.tsv.gz", "name\ttype\n感冒\tDisease\n发热\tSymptom\n感冒\tSymptom\n坏行\n无类型\t\n咳嗽\tSymptom\n", gz=True)
    counts = Counter()
    ents = read_entities(tmp_path, counts)
    assert ents.names == ["感冒", "发热", "咳嗽"] and ents.types == ["Disease", "Symptom", "Symptom"]
    assert counts["entities_duplicate"] == 1 and counts["entities_malformed"] == 2
    write_entities(ents, tmp_path / "out")
    table = pq.read_table(tmp_path / "out" / "entities.parquet").to_pydict()
    assert table == {"id": [0, 1, 2], "name": ents.names, "type": ents.types}


def test_aliases_accounting(tmp_path):
    write(tmp_path / "entities.tsv", "name\ttype\n感冒\tDisease\n流感\tDisease\n")
    write(tmp_path / "aliases.tsv", "alias\tname\n伤风\t感冒\n伤风\t感冒\n流感\t感冒\n某某\t不存在\n感冒\t感冒\n")
    counts = Counter()
    ents = read_entities(tmp_path, counts)
    aliases = read_aliases(tmp_path, ents, counts)
    assert aliases == [("伤风", 0), ("流感", 0)]
    assert counts["aliases_duplicate"] == 1 and counts["aliases_unknown_entity"] == 1
    assert counts["aliases_self"] == 1 and counts["aliases_name_collision"] == 1


def test_unusable_kg_is_one_clear_error(tmp_path):
    with pytest.raises(KeplmError, match="no entities.tsv"):
        read_entities(tmp_path)
    write(tmp_path / "entities.tsv", "wrong\theader\n感冒\tDisease\n")
    with pytest.raises(KeplmError, match="expected header"):
        read_entities(tmp_path)
    write(tmp_path / "entities.tsv", "name\ttype\n")
    with pytest.raises(KeplmError, match="no usable entity"):
        read_entities(tmp_path)
