#!/usr/bin/env python3
# Two real-text classification tasks for the aTLAS BERT benchmark (docs/atlas.md): sentences
# from the Python standard library's docstrings and comments, labelled by module family, tokenized
# with all-MiniLM-L6-v2's tokenizer (needs the `tokenizers` package and the model folder, e.g.
# the files `make minilm` unpacks plus tokenizer.json). Task 0: email, http/urllib, unittest
# (labels 0-2); task 1: asyncio, xml, multiprocessing (labels 3-5). Writes train/val/test .jsonl
# ({"input_ids", "label", "task"}) and per-task files into the current folder.
#   python3 scripts/make-bert-text-tasks.py   (run where minilm/tokenizer.json is)
# Then, as in docs/atlas.md:
#   mergekit train minilm --classes 6 --data train.jsonl --epochs 1 --lr 5e-5 --batch-size 16 -o base
#   mergekit train base --data train-task0.jsonl --epochs 3 --lr 5e-5 --batch-size 16 -o ft0   (and ft1)
#   mergekit task-vector ft0 --base base -o tv0.safetensors                                   (and tv1)
#   mergekit atlas learn base tv0.safetensors tv1.safetensors --data val.jsonl -o atlas
#   mergekit eval atlas --data test.jsonl
import glob, json, random, re, sys, ast
from tokenizers import Tokenizer
tok = Tokenizer.from_file('minilm/tokenizer.json'); tok.no_padding(); tok.no_truncation()
lib = glob.glob('/usr/lib/python3.*/')[0]
groups = {
  0: ['email'], 1: ['http', 'urllib'], 2: ['unittest'],        # task 0
  3: ['asyncio'], 4: ['xml'], 5: ['multiprocessing'],          # task 1
}
def sentences(paths):
    out = []
    for p in paths:
        try: src = open(p, encoding='utf-8').read()
        except Exception: continue
        try: tree = ast.parse(src)
        except Exception: continue
        texts = [ast.get_docstring(n) for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        texts += [m.group(1) for m in re.finditer(r'#\s*(.+)', src)]
        for t in texts:
            if not t: continue
            for s in re.split(r'(?<=[.!?])\s+|\n\s*\n', t):
                s = ' '.join(s.split())
                w = s.split()
                if 6 <= len(w) <= 40 and re.search('[a-z]', s): out.append(s)
    return sorted(set(out))
random.seed(0)
data = {}
for label, mods in groups.items():
    paths = []
    for m in mods: paths += glob.glob(lib + m + '/**/*.py', recursive=True) + glob.glob(lib + m + '.py')
    s = sentences(paths); random.shuffle(s); data[label] = s
    print(label, mods, len(s), file=sys.stderr)
def write(name, rows):
    with open(name, 'w') as f:
        for text, label in rows:
            ids = tok.encode(text).ids[:48]
            f.write(json.dumps({'input_ids': ids, 'label': label, 'task': label // 3}) + '\n')
n_train, n_val, n_test = 120, 20, 100
splits = {'train': [], 'val': [], 'test': []}
for label, s in data.items():
    splits['train'] += [(x, label) for x in s[:n_train]]
    splits['val'] += [(x, label) for x in s[n_train:n_train + n_val]]
    splits['test'] += [(x, label) for x in s[n_train + n_val:n_train + n_val + n_test]]
for k, rows in splits.items():
    random.shuffle(rows)
    write(k + '.jsonl', rows)
    for t in (0, 1): write(f'{k}-task{t}.jsonl', [r for r in rows if r[1] // 3 == t])
