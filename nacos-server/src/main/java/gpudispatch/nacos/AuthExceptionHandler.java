package gpudispatch.nacos;

import com.alibaba.nacos.auth.exception.AccessException;
import org.springframework.core.Ordered;
import org.springframework.core.annotation.Order;
import org.springframework.http.HttpStatus;
import org.springframework.http.ResponseEntity;
import org.springframework.web.bind.annotation.ControllerAdvice;
import org.springframework.web.bind.annotation.ExceptionHandler;

/**
 * How the auth API answers failures, as Nacos's console does: an {@link AccessException} is a 403
 * whose body is its message ("unknown user!", "authorization failed!"), a bad argument a 400 with
 * the reason. Ordered first, so the naming module's handler (which maps any NacosException by its
 * code) does not take these.
 */
@ControllerAdvice(assignableTypes = {UserController.class, RoleController.class, PermissionController.class})
@Order(Ordered.HIGHEST_PRECEDENCE)
public class AuthExceptionHandler {

    @ExceptionHandler(AccessException.class)
    public ResponseEntity<String> accessDenied(AccessException e) {
        return ResponseEntity.status(HttpStatus.FORBIDDEN).body(e.getErrMsg());
    }

    @ExceptionHandler(IllegalArgumentException.class)
    public ResponseEntity<String> badArgument(IllegalArgumentException e) {
        return ResponseEntity.status(HttpStatus.BAD_REQUEST).body("caused: " + e.getMessage() + ";");
    }
}
