"""OpenAI Files: POST /v1/files (multipart), GET /v1/files, GET/DELETE /v1/files/{id},
GET /v1/files/{id}/content.

An upload is parsed by Starlette's multipart parser, which spools a file part to a temporary
file past 1 MB, then copied into the data dir off the event loop: the content is never held
whole in memory. Its size limit is ``--max-file-size``, not ``--max-body-size`` (the Guard
middleware applies the larger one to its UPLOAD_PATHS and stops reading past it).
"""

from __future__ import annotations

from typing import Any

import anyio.to_thread
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Route

from llmserve.errors import InvalidRequest, NotFound, RequestTooLarge, StoreDisabled
from llmserve.ids import object_id
from llmserve.protocol import openai as oa
from llmserve.server.state import AppState
from llmserve.store import Store

PURPOSES = ("batch", "assistants", "fine-tune", "vision", "user_data", "evals")


def store_of(request: Request) -> Store:
    store = AppState.of(request).store
    if store is None:
        raise StoreDisabled("this server runs with --no-store: files and batches need its "
                            "data dir (--data-dir)")
    return store


def file_object(file_id: str, *, size: int, filename: str, purpose: str,
                created_at: int | None = None) -> dict[str, Any]:
    return {"id": file_id, "object": "file", "bytes": size,
            "created_at": created_at or oa.now(), "filename": filename, "purpose": purpose,
            "status": "processed", "expires_at": None, "status_details": None}


def known_file(store: Store, file_id: str, param: str | None = None) -> dict[str, Any]:
    found = store.get_file(file_id)
    if found is None:
        raise NotFound(f"no file with id {file_id!r}", param=param)
    return found


async def upload(request: Request) -> JSONResponse:
    store = store_of(request)
    limit = AppState.of(request).options.max_file_size
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise InvalidRequest("upload a file as multipart/form-data with the fields 'file' and "
                             "'purpose'")
    async with request.form(max_files=1, max_fields=8) as form:
        purpose = form.get("purpose")
        upload = form.get("file")
        if not isinstance(purpose, str) or not purpose:
            raise InvalidRequest("the field 'purpose' is required", param="purpose")
        if purpose not in PURPOSES:
            raise InvalidRequest(f"purpose must be one of {', '.join(PURPOSES)}; got "
                                 f"{purpose!r}", param="purpose")
        if not isinstance(upload, UploadFile):
            raise InvalidRequest("the field 'file' must be a file", param="file")
        if upload.size is not None and upload.size > limit:
            raise RequestTooLarge(f"the file is larger than the server's limit of {limit} "
                                  "bytes (--max-file-size)")
        await upload.seek(0)
        body = file_object(object_id("file-"), size=0, filename=upload.filename or "upload",
                           purpose=purpose)
        size = await anyio.to_thread.run_sync(store.write_file, body, upload.file)
    return JSONResponse({**body, "bytes": size})


async def list_files(request: Request) -> JSONResponse:
    purpose = request.query_params.get("purpose")
    files = store_of(request).list_files(purpose)
    return JSONResponse({"object": "list", "data": files, "has_more": False,
                         "first_id": files[0]["id"] if files else None,
                         "last_id": files[-1]["id"] if files else None})


async def retrieve(request: Request) -> JSONResponse:
    return JSONResponse(known_file(store_of(request), request.path_params["file_id"]))


async def content(request: Request) -> FileResponse:
    store = store_of(request)
    found = known_file(store, request.path_params["file_id"])
    return FileResponse(store.file_path(found["id"]), filename=found["filename"],
                        media_type="application/octet-stream")


async def delete(request: Request) -> JSONResponse:
    file_id = request.path_params["file_id"]
    if not store_of(request).delete_file(file_id):
        raise NotFound(f"no file with id {file_id!r}")
    return JSONResponse({"id": file_id, "object": "file", "deleted": True})


routes = [
    Route("/v1/files", upload, methods=["POST"]),
    Route("/v1/files", list_files, methods=["GET"]),
    Route("/v1/files/{file_id}", retrieve, methods=["GET"]),
    Route("/v1/files/{file_id}", delete, methods=["DELETE"]),
    Route("/v1/files/{file_id}/content", content, methods=["GET"]),
]
