def sm90_compile_specs(): return []
