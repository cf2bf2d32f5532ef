"""Router for POST /v1/responses (OpenAI's Responses API, stateless: see serving_responses)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from edgefleet.agent.api.bounded_body import BoundedBodyRoute
from edgefleet.agent.api.openapi import MODEL_ERRORS
from edgefleet.agent.api.protocol_responses import ResponseObject, ResponsesRequest
from edgefleet.agent.api.serving_responses import ServingResponses

router = APIRouter(route_class=BoundedBodyRoute)

# One event of a streamed response: a response.* event (its fields depend on its type), an
# error, or the closing [DONE]; OpenAPI 3.1's contentSchema says what the JSON data holds.
_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "anyOf": [
                {"const": "[DONE]"},
                {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": {
                        "anyOf": [
                            {
                                "type": "object",
                                "required": ["type", "sequence_number"],
                                "properties": {
                                    "type": {"type": "string"},
                                    "sequence_number": {"type": "integer"},
                                },
                            },
                            {"$ref": "#/components/schemas/ErrorResponse"},
                        ]
                    },
                },
            ]
        }
    },
}


def responses_serving(request: Request) -> ServingResponses:
    value = getattr(request.app.state, "serving_responses", None)
    if not isinstance(value, ServingResponses):
        raise TypeError("app.state.serving_responses is not set; build the app with create_app()")
    return value


@router.post(
    "/v1/responses",
    response_model=None,
    responses={
        200: {
            "model": ResponseObject,
            "description": "The response, or with stream=true response.* events (server-sent events)",
            "content": {"text/event-stream": {"schema": _EVENT}},
        },
        **MODEL_ERRORS,
    },
)
async def create_response(
    request: ResponsesRequest, raw: Request, serving: ServingResponses = Depends(responses_serving)
) -> Response:
    return await serving.respond(request, raw)
