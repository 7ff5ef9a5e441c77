PGO: int
KIND: str
