"""Built-in specs, by name. Values are import paths so nothing loads until asked for."""

BUILTIN_SPECS: dict[str, str] = {
    "seqsetvae": "headcache.backbones.seqsetvae:make_spec",
    "demo": "headcache.backbones.demo:make_spec",
    "hf": "headcache.backbones.hf:make_spec",
    "exported": "headcache.backbones.exported:make_spec",
}
